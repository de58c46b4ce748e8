"""Trusted files opened one way (kmskeys/fileio.py): each refusal, by its problem word.

Trust means root-owned, so these run as root (as CI does) and make hostile files with chown.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kmskeys import fileio

pytestmark = pytest.mark.unit
NOBODY = 65534


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("kmskeys.fileio's tests need root: trusted means root-owned")


def _refused(call: object, problem: str) -> fileio.UntrustedFileError:
    with pytest.raises(fileio.UntrustedFileError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.problem == problem, caught.value
    return caught.value


def test_a_trusted_file_reads_and_each_refusal_has_its_word(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_bytes(b"kmst")
    assert fileio.read_file(good, 16, "config") == b"kmst"
    _refused(lambda: fileio.read_file(tmp_path / "absent", 16, "config"), fileio.MISSING)
    link = tmp_path / "link"
    link.symlink_to(good)
    found = _refused(lambda: fileio.read_file(link, 16, "config"), fileio.SYMLINK)
    assert str(found) == "config is a symbolic link" and found.path == str(link)
    assert fileio.read_file(link, 16, "config", fileio.FOLLOW) == b"kmst"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opened O_NONBLOCK: refused, never waited on
    _refused(lambda: fileio.read_file(fifo, 16, "config"), fileio.NOT_REGULAR)
    _refused(lambda: fileio.read_file(good, 3, "config"), fileio.TOO_LARGE)
    os.chown(good, NOBODY, 0)
    found = _refused(lambda: fileio.read_file(good, 16, "config"), fileio.UNSAFE)
    assert "owned by uid 65534, not root" in str(found)
    os.chown(good, 0, 0)
    os.chmod(good, 0o646)
    assert "writable by group or others" in str(
        _refused(lambda: fileio.read_file(good, 16, "config"), fileio.UNSAFE)
    )
    os.chmod(good, 0o644)
    assert "readable by group or others (mode 0644, want 0600)" in str(
        _refused(lambda: fileio.read_file(good, 16, "x", fileio.PRIVATE), fileio.UNSAFE)
    )


def test_a_directory_is_made_root_only_and_checked(tmp_path: Path) -> None:
    made = tmp_path / "state"
    fd = fileio.open_dir(made, "state_dir", fileio.CREATE | fileio.PRIVATE)
    os.close(fd)
    assert made.stat().st_mode & 0o777 == 0o700
    os.chmod(made, 0o755)
    found = _refused(lambda: fileio.open_dir(made, "state_dir", fileio.PRIVATE), fileio.UNSAFE)
    assert "open to group or others (mode 0755, want 0700)" in str(found)
    (tmp_path / "file").write_text("")
    _refused(lambda: fileio.open_dir(tmp_path / "file", "d"), fileio.NOT_DIRECTORY)


def test_reading_below_a_root_never_follows_a_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "b.kms").write_text("kmst")
    (tmp_path / "a").symlink_to("real")
    assert fileio.read_below(tmp_path, "real/b.kms", 16, "blob_dir", "blob") == b"kmst"
    found = _refused(
        lambda: fileio.read_below(tmp_path, "a/b.kms", 16, "blob_dir", "blob"), fileio.SYMLINK
    )
    assert str(found) == "blob directory 'a' is a symbolic link"
    _refused(lambda: fileio.read_below(tmp_path, "../x", 16, "blob_dir", "blob"), fileio.UNSAFE)


def test_an_atomic_write_replaces_and_a_new_write_never_does(tmp_path: Path) -> None:
    path = tmp_path / "rule.conf"
    fileio.write_atomic(path, b"one", 0o644)
    fileio.write_atomic(path, b"two", 0o644)
    st = path.stat()
    assert (path.read_bytes(), st.st_uid, st.st_mode & 0o777) == (b"two", 0, 0o644)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        won: list[bool] = []
        writers = [
            threading.Thread(
                target=lambda i=i: won.append(fileio.write_new(dir_fd, "e", b"%d" % i))
            )
            for i in range(8)
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
    finally:
        os.close(dir_fd)
    assert sorted(won) == [False] * 7 + [True]
    assert (tmp_path / "e").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(fileio.TEMP_PREFIX)] == []


@pytest.mark.parametrize(("durable", "fsyncs"), [(True, 2), (False, 0)])
def test_a_new_write_is_fsynced_only_when_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool, fsyncs: int
) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert fileio.write_new(dir_fd, "e", b"state", durable=durable)
        assert not fileio.write_new(dir_fd, "e", b"other", durable=durable)
    finally:
        os.close(dir_fd)
    assert len(synced) == 2 * fsyncs  # file and directory, per write
    assert (tmp_path / "e").read_bytes() == b"state"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(fileio.TEMP_PREFIX)] == []
