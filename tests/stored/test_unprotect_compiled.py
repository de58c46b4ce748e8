"""`kmskeys unprotect` in C (bin/unprotect.c) against the Python CLI, through the real upcall.

The compiled command answers a binary blob of up to one default chunk whose master key is
cached, from a regular file or a pipe whose writer is done; everything else is the Python CLI's
(`kmskeys-py`), which it execs with stdin untouched. Each test runs the same input through
both and asserts the same exit code, stdout and stderr; `-X importtime` tells which answered
(tests/kernel/test_cli_compiled.py does the same for `get`).
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import kmskeys
from kmskeys import Keyring, dpapi, keyutils
from kmskeys.cli import (
    EXIT_FOREIGN,
    EXIT_NOT_A_BLOB,
    EXIT_NOT_AUTHENTIC,
    EXIT_OK,
    EXIT_UNKNOWN_VERSION,
    EXIT_USAGE,
    EXIT_WRONG_USER,
)
from kmskeys.protectblob import DEFAULT_CHUNK, TAG_BYTES, read_header
from tests.stored.conftest import UID_A, as_user
from tests.stored.harness import StoredInstall
from tests.support.names import unique
from tests.support.requester import NOBODY

pytestmark = pytest.mark.upcall

KMSKEYS = Path(sys.executable).with_name("kmskeys")
KMSKEYS_PY = KMSKEYS.with_name("kmskeys-py")
OPEN = 0x3F3F3F3F
PIPE_MAX = int(Path("/proc/sys/fs/pipe-max-size").read_text())


@dataclass
class Answer:
    code: int
    stdout: bytes
    stderr: bytes  # without the `import time:` lines
    python: bool  # whether Python ran in the process
    stdin_left: int | None  # where a file stdin was left, or the bytes a pipe stdin kept

    def same(self) -> tuple[int, bytes, bytes, int | None]:
        return self.code, self.stdout, self.stderr, self.stdin_left


Feed = Callable[[], tuple[object, Callable[[], int | None]]]


def from_file(path: Path, offset: int = 0) -> Feed:
    """stdin: the file at `path`, opened at `offset`; reports where it was left."""

    def feed() -> tuple[object, Callable[[], int | None]]:
        src = path.open("rb")
        src.seek(offset)
        return src, lambda: (src.tell(), src.close())[0]

    return feed


def from_pipe(data: bytes) -> Feed:
    """stdin: a pipe holding all of `data`, its writer closed; reports the bytes left in it."""

    def feed() -> tuple[object, Callable[[], int | None]]:
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, max(len(data), 4096))
        os.write(write_end, data)
        os.close(write_end)

        def left() -> int:
            os.set_blocking(read_end, False)
            try:
                return len(os.read(read_end, 1 << 21))
            except BlockingIOError:
                return 0
            finally:
                os.close(read_end)

        return read_end, left

    return feed


def answer(command: Path, args: list[str], feed: Feed, **kwargs: object) -> Answer:
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    stdin, left = feed()
    kwargs = {"stdout": subprocess.PIPE, **kwargs}
    try:
        done = subprocess.run(
            [str(command), "unprotect", *args],
            stdin=stdin,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
            check=False,
            **kwargs,
        )  # type: ignore[call-overload]
    finally:
        where = left()
    lines = done.stderr.splitlines(keepends=True)
    traced = [line for line in lines if line.startswith(b"import time:")]
    rest = b"".join(line for line in lines if not line.startswith(b"import time:"))
    return Answer(done.returncode, done.stdout, rest, bool(traced), where)


def both(args: list[str], feed: Feed, **kwargs: object) -> tuple[Answer, Answer]:
    """The compiled command's answer and the Python CLI's, to the same input."""
    return answer(KMSKEYS, args, feed, **kwargs), answer(KMSKEYS_PY, args, feed, **kwargs)


def _blob(stored: StoredInstall, data: bytes, **options: object) -> bytes:
    out = io.BytesIO()
    options.setdefault("name", unique("cblob"))
    dpapi.protect_stream(io.BytesIO(data), out, prefix=stored.stored_prefix, **options)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.mark.parametrize(
    "form",
    [
        ["--prefix", "P"],
        ["--prefix=P"],
        ["--show-description", "--prefix", "P"],
        ["--prefix", "P", "--entropy-file", "E"],
        ["--entropy-file=E", "--show-description", "--prefix=P"],
    ],
    ids=" ".join,
)
def test_a_cached_unprotect_is_answered_without_python(
    form: list[str], stored: StoredInstall, tmp_path: Path
) -> None:
    entropy = tmp_path / "entropy"
    entropy.write_bytes(os.urandom(100))
    data = os.urandom(3000)
    options: dict[str, object] = {"description": "db dump, 2026"}
    if "E" in " ".join(form):
        options["entropy"] = entropy.read_bytes()
    blob = tmp_path / "blob"
    blob.write_bytes(_blob(stored, data, **options))
    args = [a.replace("=E", f"={entropy}").replace("P", stored.stored_prefix) for a in form]
    args = [str(entropy) if a == "E" else a for a in args]
    assert answer(KMSKEYS_PY, args, from_file(blob)).stdout == data  # the master key, cached
    for feed in (from_file(blob), from_pipe(blob.read_bytes())):
        fast, slow = both(args, feed)
        assert not fast.python, fast.stderr
        assert (fast.code, fast.stdout) == (EXIT_OK, data)
        shown = b"description: db dump, 2026\n" if "--show-description" in form else b""
        assert fast.stderr == shown
        assert fast.same() == slow.same()


@pytest.mark.parametrize(
    ("what", "data", "options"),
    [
        ("empty data", b"", {}),
        ("several small chunks", os.urandom(10_000), {"chunk_size": 4096}),
        ("a full default chunk", os.urandom(DEFAULT_CHUNK), {}),
        ("machine scope", b"host data", {"scope": "machine", "name": unique("machine")}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_blobs_the_compiled_path_opens(
    what: str, data: bytes, options: dict[str, object], stored: StoredInstall, tmp_path: Path
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"ignored prefix" + _blob(stored, data, **options))
    args = ["--prefix", stored.stored_prefix]
    answer(KMSKEYS_PY, args, from_file(blob, 14))  # the master key, cached
    fast, slow = both(args, from_file(blob, 14))
    assert not fast.python, (what, fast.stderr)
    assert (fast.code, fast.stdout, fast.stderr) == (EXIT_OK, data, b"")
    assert fast.stdin_left == blob.stat().st_size  # read to its end, from where it stood
    assert fast.same() == slow.same()
    raw = blob.read_bytes()[14:]
    if len(raw) <= PIPE_MAX:  # a pipe holds no more (fs.pipe-max-size): a writer waits for us
        piped = answer(KMSKEYS, args, from_pipe(raw))
        assert (piped.python, piped.stdout, piped.stdin_left) == (False, data, 0)


def _cached_blob(stored: StoredInstall, tmp_path: Path, data: bytes, **options: object) -> Path:
    blob = tmp_path / "blob"
    blob.write_bytes(_blob(stored, data, **options))
    answer(KMSKEYS_PY, ["--prefix", stored.stored_prefix], from_file(blob))
    return blob


def _damaged(stored: StoredInstall, tmp_path: Path) -> dict[str, bytes]:
    raw = _blob(stored, os.urandom(10_000), chunk_size=4096, description="caf\u00e9")
    head = read_header(io.BytesIO(raw).read)[1]
    plain_desc = _blob(stored, b"x", description="plain")
    return {
        "text form": kmskeys.protect(b"text", prefix=stored.stored_prefix).encode(),
        "a description beyond ASCII": raw,
        "last chunk dropped": raw[: len(head) + 2 * (4096 + TAG_BYTES)],
        "chunk tampered": raw[:-100] + bytes([raw[-100] ^ 1]) + raw[-99:],
        "header tampered": plain_desc.replace(b"plain", b"plaiN"),
        "header only": head,
        "not a blob": b"plain text, not a blob",
        "empty": b"",
        "larger than one chunk and a header": _blob(stored, os.urandom(DEFAULT_CHUNK + 4096)),
        "version 9": plain_desc[:10] + b"\x00\x00\x00\x09" + plain_desc[14:],
    }


def test_every_other_blob_is_the_python_clis(stored: StoredInstall, tmp_path: Path) -> None:
    expected = {
        "text form": EXIT_OK,
        "a description beyond ASCII": EXIT_OK,
        "larger than one chunk and a header": EXIT_OK,
        "version 9": EXIT_UNKNOWN_VERSION,
        "not a blob": EXIT_NOT_A_BLOB,
        "empty": EXIT_NOT_A_BLOB,
    }
    args = ["--prefix", stored.stored_prefix]
    for what, raw in _damaged(stored, tmp_path).items():
        blob = tmp_path / "damaged"
        blob.write_bytes(raw)
        answer(KMSKEYS_PY, args, from_file(blob))  # any master key it names, cached
        feeds = [from_file(blob)] + ([from_pipe(raw)] if len(raw) <= PIPE_MAX else [])
        for feed in feeds:
            fast, slow = both(args, feed)
            assert fast.python, what
            # stdin included: left where the Python CLI alone leaves it, so untouched by C.
            assert fast.same() == slow.same(), what
            assert fast.code == expected.get(what, EXIT_NOT_AUTHENTIC), (what, fast.stderr)


def test_a_miss_goes_to_python_then_the_key_is_cached(
    stored: StoredInstall, tmp_path: Path
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(_blob(stored, b"first"))
    Keyring.join_session()  # nothing cached
    args = ["--prefix", stored.stored_prefix]
    first = answer(KMSKEYS, args, from_file(blob))
    assert (first.code, first.stdout, first.python) == (EXIT_OK, b"first", True)
    second = answer(KMSKEYS, args, from_file(blob))
    assert (second.code, second.stdout, second.python) == (EXIT_OK, b"first", False)


def test_a_blob_of_another_uid_is_the_python_clis(stored: StoredInstall, tmp_path: Path) -> None:
    name = unique("private")
    made = as_user(UID_A, lambda: _blob(stored, b"for A", name=name).hex())
    blob = tmp_path / "blob"
    blob.write_bytes(bytes.fromhex(str(made["ok"])))
    fast, slow = both(["--prefix", stored.stored_prefix], from_file(blob))
    assert fast.python and fast.code == EXIT_WRONG_USER
    assert fast.same() == slow.same()


def test_a_master_key_planted_by_another_uid_is_never_used(
    stored: StoredInstall, tmp_path: Path, session_keyring: Keyring
) -> None:
    name = unique("planted")
    blob = tmp_path / "blob"
    blob.write_bytes(_blob(stored, b"x", name=name))
    Keyring.join_session()  # the real key is no longer in reach; a planted one is
    ring = Keyring.session()
    desc = f"{stored.stored_prefix}:{name}#user#v1"
    planted = ring.add_key("user", desc, bytes(32))
    keyutils.keyctl_setperm(planted.serial, OPEN)
    keyutils.keyctl_chown(planted.serial, NOBODY, -1)
    fast, slow = both(["--prefix", stored.stored_prefix], from_file(blob))
    assert fast.python and fast.code == EXIT_FOREIGN and fast.stdout == b""
    assert fast.same() == slow.same()


@pytest.mark.parametrize(
    "form",
    [
        ["-h"],
        ["--pre", "P"],
        ["--prefix", "P", "--prefix", "P"],
        ["--prefix", "P", "extra"],
        ["--prefix", "P", "--show-description=yes"],
        ["--prefix", "P", "--show-description", "--show-description"],
        ["--prefix", "-P"],
        ["--prefix", "Bad"],
        ["--prefix", "P", "--entropy-file", "./entropy"],
        ["--prefix", "P", "--entropy-file", "/dev/null"],
        ["--prefix", "P", "--entropy-file", "missing"],
        ["--prefix", "P", "--entropy-file", "big"],
        ["--prefix", "P", "--"],
    ],
    ids=" ".join,
)
def test_every_other_option_is_the_python_clis(
    form: list[str], stored: StoredInstall, tmp_path: Path
) -> None:
    blob = _cached_blob(stored, tmp_path, b"data")
    (tmp_path / "entropy").write_bytes(b"e")
    (tmp_path / "big").write_bytes(bytes((1 << 20) + 1))
    args = [stored.stored_prefix if a == "P" else a for a in form]
    fast, slow = both(args, from_file(blob), cwd=tmp_path)
    assert fast.python
    assert fast.same() == slow.same()
    assert fast.code in (EXIT_OK, EXIT_USAGE, 1, EXIT_NOT_AUTHENTIC), fast.stderr


def test_a_pipe_still_being_written_is_the_python_clis(
    stored: StoredInstall, tmp_path: Path
) -> None:
    blob = _cached_blob(stored, tmp_path, b"slow writer")
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [str(KMSKEYS), "unprotect", "--prefix", stored.stored_prefix],
        stdin=read_end,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
    )
    os.close(read_end)

    def write_late() -> None:
        time.sleep(0.3)
        os.write(write_end, blob.read_bytes())
        os.close(write_end)

    writer = threading.Thread(target=write_late)
    writer.start()
    out, err = proc.communicate(timeout=60)
    writer.join()
    assert (proc.returncode, out) == (EXIT_OK, b"slow writer")
    assert b"import time:" in err


@pytest.mark.parametrize("sink", ["closed pipe", "/dev/full"])
def test_a_failed_write_is_the_python_clis(
    sink: str, stored: StoredInstall, tmp_path: Path
) -> None:
    # Nothing was written and stdin is untouched: the Python CLI meets the same failure.
    blob = _cached_blob(stored, tmp_path, b"nowhere to go")
    results = []
    for command in (KMSKEYS, KMSKEYS_PY):
        if sink == "closed pipe":
            read_end, out = os.pipe()
            os.close(read_end)
        else:
            out = os.open(sink, os.O_WRONLY)
        try:
            results.append(
                answer(command, ["--prefix", stored.stored_prefix], from_file(blob), stdout=out)
            )
        finally:
            os.close(out)
    fast, slow = results
    assert fast.python and fast.code != EXIT_OK
    assert (fast.code, fast.stdin_left) == (slow.code, slow.stdin_left)
    assert re.sub(rb"\d+", b"N", fast.stderr) == re.sub(rb"\d+", b"N", slow.stderr)
