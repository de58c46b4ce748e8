"""Hostile config and blob files: each is refused with a clear log line, none blocks the handler.

World-writable, owned by another uid, a symbolic link, a FIFO, 100 MB (sparse). A config the
resolver cannot trust is not trusted for its syslog_socket either, so those lines go to the
default /dev/log, which the `dev_log` fixture provides for the test.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kmskeys import KeyRejectedError, cli, get_secret
from tests.support.names import unique
from tests.upcall.harness import Install, SyslogReader, handler_pids, installed, kms_stack

pytestmark = [pytest.mark.fuzz, pytest.mark.upcall]

DEV_LOG = Path("/dev/log")
HUNDRED_MB = 100 * 1024 * 1024
DEADLINE = 3


@pytest.fixture(scope="module")
def files_install() -> Iterator[Install]:
    with kms_stack() as stack, installed(*stack, deadline=DEADLINE) as install:
        yield install


@pytest.fixture
def install(files_install: Install, session_keyring: object) -> Install:
    assert files_install.proxy is not None
    files_install.proxy.reset_counts()
    files_install.log.drain()
    return files_install


@pytest.fixture
def dev_log() -> Iterator[SyslogReader]:
    """A reader bound at /dev/log for one test; a real syslog socket is moved aside meanwhile."""
    saved = DEV_LOG.with_name(f"log.{unique('saved')}")
    if DEV_LOG.exists() or DEV_LOG.is_symlink():
        DEV_LOG.rename(saved)
    reader = SyslogReader(DEV_LOG)
    try:
        yield reader
    finally:
        reader.close()
        DEV_LOG.unlink(missing_ok=True)
        if saved.exists() or saved.is_symlink():
            saved.rename(DEV_LOG)


def _world_writable(path: Path) -> None:
    os.chmod(path, 0o666)


def _wrong_owner(path: Path) -> None:
    os.chown(path, 65534, 65534)


def _symlinked(path: Path) -> None:
    # The link's target is a perfectly safe root-owned file: the link itself is the problem.
    target = path.with_name(path.name + ".real")
    shutil.copy2(path, target)
    path.unlink()
    path.symlink_to(target)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o644)


def _huge(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(HUNDRED_MB)  # sparse: the size is what the handler must refuse on


BAD_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "world-writable": (_world_writable, "writable by group or others"),
    "wrong-owner": (_wrong_owner, "owned by uid 65534"),
    "symlink": (_symlinked, "is a symbolic link"),
    "fifo": (_fifo, "is not a regular file"),
    "100MB": (_huge, "is larger than"),
}


def _restore(path: Path, text: str, mode: int = 0o644) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".real").unlink(missing_ok=True)
    path.write_text(text)
    os.chown(path, 0, 0)
    os.chmod(path, mode)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_blob_file_is_refused_with_a_clear_line(install: Install, case: str) -> None:
    spoil, why = BAD_FILES[case]
    name = unique(case)
    path = install.deploy(name, install.blob(b"kmst-file-secret", name))
    spoil(path)
    start = time.monotonic()
    with pytest.raises(KeyRejectedError):
        install.get(name)
    assert time.monotonic() - start < DEADLINE  # never blocked, even on the FIFO
    line = install.log.wait_for(name)
    assert "outcome=refused" in line and why in line, line
    assert install.decrypts() == 0
    assert handler_pids(install.config) == []


def test_world_writable_blob_dir_is_refused(install: Install) -> None:
    name = unique("opendir")
    install.deploy(name, install.blob(b"x", name))
    os.chmod(install.blob_dir, 0o777)
    try:
        with pytest.raises(KeyRejectedError):
            install.get(name)
    finally:
        os.chmod(install.blob_dir, 0o755)
    assert "blob_dir" in (line := install.log.wait_for(name)) and "writable" in line, line


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_config_file_is_refused_with_a_clear_line(
    install: Install, dev_log: SyslogReader, case: str
) -> None:
    spoil, why = BAD_FILES[case]
    original = install.config.read_text()
    name = unique(case)
    text = install.blob(b"kmst-config-secret", name)
    spoil(install.config)
    try:
        start = time.monotonic()
        with pytest.raises(KeyRejectedError):
            get_secret(name, text, prefix=install.prefix)
        assert time.monotonic() - start < DEADLINE
    finally:
        _restore(install.config, original)
    line = dev_log.wait_for(f"{install.prefix}:{name}")
    assert "outcome=refused" in line and "config" in line and why in line, line
    assert install.log.drain() == []  # the untrusted config's own socket was not used
    # Fixed config: the refusal was cached for the built-in negative_ttl, so flush it.
    assert cli.main(["flush", name, "--prefix", install.prefix]) == 0
    assert get_secret(name, text, prefix=install.prefix) == b"kmst-config-secret"
