"""The compiled `kmskeys` command (bin/kmskeys.c) against the real keyring.

It answers a cached `kmskeys get` itself and execs the Python CLI (`kmskeys-py`) for everything
else. Each test runs the same arguments through both and asserts the same exit code, stdout and
stderr; which one answered shows in `-X importtime` (PYTHONPROFILEIMPORTTIME): a process in
which Python ran prints `import time:` lines to stderr, the C program prints nothing there.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmskeys import Keyring, keyutils
from kmskeys.cli import (
    EXIT_ERROR,
    EXIT_FOREIGN,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_QUOTA,
    EXIT_REFUSED,
    EXIT_STALE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from kmskeys.contract import USER_PAYLOAD_MAX
from kmskeys.names import MAX_NAME_BYTES
from tests.support.names import unique, unique_prefix
from tests.support.request_key_rule import request_key_rule
from tests.support.requester import NOBODY

pytestmark = pytest.mark.kernel

KMSKEYS = Path(sys.executable).with_name("kmskeys")
KMSKEYS_PY = KMSKEYS.with_name("kmskeys-py")
OPEN = 0x3F3F3F3F
PAGE = os.sysconf("SC_PAGESIZE")


@dataclass
class Answer:
    code: int
    stdout: bytes
    stderr: bytes  # without the `import time:` lines
    python: bool  # whether Python ran in the process

    def same(self) -> tuple[int, bytes, bytes]:
        # Negative keys' remaining lifetime is in the message; two runs may straddle a second.
        return self.code, self.stdout, re.sub(rb"expires in \d+ ?\w+", b"expires in T", self.stderr)


def answer(command: Path, args: list[str], **kwargs: object) -> Answer:
    """Run command with args, in Python's import-time trace mode."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    kwargs = {"stdout": subprocess.PIPE, **kwargs}
    done = subprocess.run(
        [str(command), *args], env=env, stderr=subprocess.PIPE, timeout=30, check=False, **kwargs
    )  # type: ignore[call-overload]
    lines = done.stderr.splitlines(keepends=True)
    traced = [line for line in lines if line.startswith(b"import time:")]
    rest = b"".join(line for line in lines if not line.startswith(b"import time:"))
    return Answer(done.returncode, done.stdout, rest, bool(traced))


def both(args: list[str], **kwargs: object) -> tuple[Answer, Answer]:
    """The compiled command's answer and the Python CLI's, to the same arguments."""
    return answer(KMSKEYS, args, **kwargs), answer(KMSKEYS_PY, args, **kwargs)


def _cached(ring: Keyring, prefix: str, name: str, payload: bytes) -> int:
    return ring.add_key("user", f"{prefix}:{name}", payload).serial


@pytest.fixture
def cached(session_keyring: Keyring, tmp_path: Path) -> Iterator[tuple[str, str, bytes]]:
    """A cached key in the test's session keyring, which the commands inherit; a blob file."""
    prefix, name, secret = unique_prefix(), unique(), b"\x00kmst\xffsecret\n"
    serial = _cached(session_keyring, prefix, name, secret)
    (tmp_path / "blob").write_text("kmsk1:AAAA\n")
    try:
        yield prefix, name, secret
    finally:
        # --keyring user/persistent link the key into keyrings that outlive the test.
        keyutils.keyctl_invalidate(serial)


def _args(form: list[str], prefix: str, name: str, tmp_path: Path) -> list[str]:
    subst = {"NAME": name, "P": prefix, "BLOB": str(tmp_path / "blob")}
    return [re.sub(r"\b(NAME|P|BLOB)\b", lambda m: subst[m[1]], arg) for arg in form]


HANDLED = [
    ["get", "NAME", "--prefix", "P"],
    ["get", "--prefix=P", "NAME"],
    ["get", "--prefix", "P", "--", "NAME"],
    ["get", "NAME", "--prefix", "P", "--keyring", "session"],
    ["get", "NAME", "--keyring=user", "--prefix", "P"],
    ["get", "NAME", "--prefix", "P", "--keyring", "persistent"],
    ["get", "NAME", "--prefix", "P", "--blob", "kmsk1:AAAA"],
    ["get", "NAME", "--prefix", "P", "--blob="],
    ["get", "NAME", "--prefix", "P", "--blob", "a" * (PAGE - 1)],
    ["get", "NAME", "--prefix", "P", "--blob-file", "blob"],
    ["get", "NAME", "--prefix", "P", "--blob-file=BLOB"],
    ["get", "NAME", "--prefix", "P", "--blob-file", "../blob"],
]


@pytest.mark.parametrize("form", HANDLED, ids=" ".join)
def test_a_cached_get_is_answered_without_python(
    form: list[str], cached: tuple[str, str, bytes], tmp_path: Path
) -> None:
    prefix, name, secret = cached
    (tmp_path / "T").mkdir()
    args = _args(form, prefix, name, tmp_path)
    fast, slow = both(args, cwd=tmp_path / "T" if "../blob" in args else tmp_path)
    assert not fast.python, fast.stderr
    assert (fast.code, fast.stdout, fast.stderr) == (EXIT_OK, secret, b"")
    assert fast.same() == slow.same()


def test_the_default_prefix_the_longest_name_and_the_largest_payload(
    session_keyring: Keyring,
) -> None:
    name = unique("long").ljust(MAX_NAME_BYTES, "n")
    payload = bytes(i % 251 for i in range(USER_PAYLOAD_MAX))
    _cached(session_keyring, "kms", name, payload)
    fast, slow = both(["get", name])
    assert not fast.python
    assert (fast.code, fast.stdout) == (EXIT_OK, payload)
    assert fast.same() == slow.same()


FALLBACK = [
    ["get", "NAME", "--prefix", "P", "-h"],
    ["get", "--help"],
    ["get", "NAME", "--pre", "P"],  # argparse takes abbreviations
    ["get", "NAME", "--prefix", "P", "--prefix", "P"],
    ["get", "NAME", "--prefix"],
    ["get", "NAME", "--prefix", "-P"],
    ["get", "NAME", "--prefix", "P", "--frob"],
    ["get", "NAME", "-", "--prefix", "P"],
    ["get", "NAME", "NAME", "--prefix", "P"],
    ["get", "--prefix", "P"],
    ["get"],
    ["get", "NAME", "--prefix", "P", "--keyring", "nosuch"],
    ["get", "NAME", "--prefix", "P", "--blob", "x", "--blob-file", "blob"],
    ["get", "NAME", "--prefix", "P", "--blob-file", "./blob"],
    ["get", "NAME", "--prefix", "P", "--blob-file", ""],
    ["get", "NAME", "--prefix", "P", "--blob-file", "-"],
    ["get", "NAME", "--prefix", "P", "--blob-file", "/dev/null"],  # not a regular file
    ["get", "NAME", "--prefix", "P", "--blob-file", "missing"],
    ["get", "NAME", "--prefix", "P", "--blob-file", "."],
    ["get", "NAME", "--prefix", "P", "--blob", "a" * PAGE],  # the kernel's EINVAL
    ["get", "NAME", "--prefix", "P", "--blob", "caf\u00e9"],
    ["get", "NAME", "--prefix", "P", "--blob", "tab\there"],
    ["get", "NAME", "--prefix", "Bad"],
    ["get", "NAME", "--prefix="],
    ["GET", "NAME", "--prefix", "P"],
    ["show", "--prefix", "P"],
    ["--help"],
    [],
]


@pytest.mark.parametrize("form", FALLBACK, ids=" ".join)
def test_every_other_form_is_the_python_clis(
    form: list[str], cached: tuple[str, str, bytes], tmp_path: Path
) -> None:
    prefix, name, _ = cached
    fast, slow = both(_args(form, prefix, name, tmp_path), cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert fast.python, "answered without Python"
    assert fast.same() == slow.same()


def test_a_blob_file_too_long_for_the_kernel_goes_to_python(
    cached: tuple[str, str, bytes], tmp_path: Path
) -> None:
    # Stripped, then cut at the first NUL, as the kernel copies it: PAGE-1 bytes fit, PAGE do not.
    prefix, name, _ = cached
    for content, handled in (
        (b"\n " + b"b" * (PAGE - 1) + b"\t\r\n", True),
        (b"b" * (PAGE - 1) + b"\x00" + b"c" * PAGE, True),
        (b"b" * PAGE, False),
    ):
        (tmp_path / "big").write_bytes(content)
        fast, slow = both(["get", name, "--prefix", prefix, "--blob-file", "big"], cwd=tmp_path)
        assert fast.python != handled
        assert fast.same() == slow.same()
        assert (fast.code == EXIT_OK) == handled


def test_a_fifo_blob_file_is_left_to_python(cached: tuple[str, str, bytes], tmp_path: Path) -> None:
    # Reading a pipe would take what the Python CLI must then read: the C program never opens it.
    prefix, name, secret = cached
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [str(KMSKEYS), "get", name, "--prefix", prefix, "--blob-file", str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with fifo.open("wb") as writer:  # blocks until the reader opens it
            writer.write(b"kmsk1:AAAA\n")
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, out, err) == (EXIT_OK, secret, b"")


HOSTILE = [
    "../x",
    "a//b",
    "a/./b",
    "a/.",
    "a/",
    "/a",
    ".a",
    "a..b",
    "sp ace",
    "new\nline",
    "semi;colon",
    "caf\u00e9",
    "x" * (MAX_NAME_BYTES + 1),
]


@pytest.mark.parametrize("hostile", HOSTILE, ids=repr)
def test_a_hostile_name_is_refused_even_when_a_key_has_that_description(
    hostile: str, session_keyring: Keyring
) -> None:
    # The name is checked with names.py's grammar before any description is built: a key planted
    # under the hostile description is never found, let alone printed.
    prefix = unique_prefix()
    _cached(session_keyring, prefix, hostile, b"kmst-planted")
    fast, slow = both(["get", "--prefix", prefix, "--", hostile])
    assert fast.python
    assert (fast.code, fast.stdout) == (EXIT_USAGE, b"")
    assert b"secret name" in fast.stderr and b"kmst-planted" not in fast.stderr
    assert fast.same() == slow.same()


def test_a_key_of_another_uid_is_refused_with_the_python_message(
    session_keyring: Keyring,
) -> None:
    prefix, name = unique_prefix(), unique()
    serial = _cached(session_keyring, prefix, name, b"kmst-planted")
    keyutils.keyctl_setperm(serial, OPEN)
    keyutils.keyctl_chown(serial, NOBODY, -1)  # as if nobody had planted it here
    fast, slow = both(["get", name, "--prefix", prefix])
    assert fast.python
    assert (fast.code, fast.stdout) == (EXIT_FOREIGN, b"")
    assert f"owned by uid {NOBODY}, not by uid 0".encode() in fast.stderr
    assert b"kmst-planted" not in fast.stderr
    assert fast.same() == slow.same()


@pytest.fixture
def stand_in() -> Iterator[Path]:
    """A copy of the compiled command beside a stand-in `kmskeys-py` that says it ran (exit 42),
    in a directory any uid may enter (this machine's interpreter may not be runnable by all)."""
    where = Path(tempfile.mkdtemp(prefix="kmst-cli-"))
    try:
        where.chmod(0o755)
        shutil.copy(KMSKEYS, where / "kmskeys")
        fallback = where / "kmskeys-py"
        fallback.write_text('#!/bin/sh\nprintf "fallback: %s\\n" "$*" >&2\nexit 42\n')
        fallback.chmod(0o755)
        yield where / "kmskeys"
    finally:
        shutil.rmtree(where)


def test_the_owner_check_is_by_the_callers_uid(session_keyring: Keyring, stand_in: Path) -> None:
    # Run as uid nobody in the same session keyring: root's readable key goes to the Python CLI
    # (which refuses it, exit 9, as the test above shows), nobody's own key is printed.
    prefix = unique_prefix()
    roots = _cached(session_keyring, prefix, "roots", b"kmst-root")
    keyutils.keyctl_setperm(roots, OPEN)
    mine = _cached(session_keyring, prefix, "mine", b"kmst-nobody")
    keyutils.keyctl_setperm(mine, OPEN)
    keyutils.keyctl_chown(mine, NOBODY, -1)
    as_nobody = {"user": NOBODY, "group": NOBODY, "cwd": "/"}
    refused = answer(stand_in, ["get", "roots", "--prefix", prefix], **as_nobody)
    assert (refused.code, refused.stdout) == (42, b"")
    assert refused.stderr == f"fallback: get roots --prefix {prefix}\n".encode()
    got = answer(stand_in, ["get", "mine", "--prefix", prefix], **as_nobody)
    assert (got.code, got.stdout, got.stderr) == (EXIT_OK, b"kmst-nobody", b"")


def test_unprotect_without_its_program_is_the_python_clis(stand_in: Path) -> None:
    # `kmskeys unprotect` runs kmskeys-unprotect beside the command; where it is missing (the
    # stand-in directory has none), the Python CLI answers.
    done = answer(stand_in, ["unprotect", "--prefix", "kmst"], stdin=subprocess.DEVNULL)
    assert (done.code, done.stdout) == (42, b"")
    assert done.stderr == b"fallback: unprotect --prefix kmst\n"


def test_the_python_cli_is_found_beside_the_program_through_a_symlink(
    cached: tuple[str, str, bytes], stand_in: Path, tmp_path: Path
) -> None:
    prefix, name, secret = cached
    link = tmp_path / "kmskeys"
    link.symlink_to(stand_in)
    miss = answer(link, ["get", unique(), "--prefix", prefix])
    assert (miss.code, miss.stdout) == (42, b"")
    assert miss.stderr.startswith(b"fallback: get ")
    assert answer(link, ["get", name, "--prefix", prefix]).stdout == secret


def _revoked(ring: Keyring, prefix: str, name: str) -> None:
    keyutils.keyctl_revoke(_cached(ring, prefix, name, b"kmst-revoked"))


def _hidden(ring: Keyring, prefix: str, name: str) -> None:
    # Owner and possessor may view it, nothing more: the search meets it and answers EACCES.
    keyutils.keyctl_setperm(_cached(ring, prefix, name, b"kmst-hidden"), 0x01010000)


def _missing(ring: Keyring, prefix: str, name: str) -> None:
    pass  # no key, and no request-key rule for the prefix


@pytest.mark.parametrize(
    ("setup", "code"),
    [(_revoked, EXIT_STALE), (_hidden, EXIT_PERMISSION), (_missing, EXIT_NOT_FOUND)],
    ids=["revoked", "no-permission", "unknown"],
)
def test_kernel_errors_are_the_python_clis(
    setup: object, code: int, session_keyring: Keyring
) -> None:
    prefix, name = unique_prefix(), unique()
    setup(session_keyring, prefix, name)  # type: ignore[operator]
    answer(KMSKEYS_PY, ["get", name, "--prefix", prefix])  # the negative key of a miss
    fast, slow = both(["get", name, "--prefix", prefix])
    assert fast.python
    assert (fast.code, fast.stdout) == (code, b"")
    assert fast.same() == slow.same()


@pytest.mark.upcall
@pytest.mark.parametrize(
    ("error", "code"),
    [
        ("rejected", EXIT_REFUSED),
        (str(errno.EAGAIN), EXIT_UNAVAILABLE),
        (str(errno.EDQUOT), EXIT_QUOTA),
        (str(errno.EIO), EXIT_ERROR),
    ],
)
def test_resolver_answers_are_the_python_clis(
    error: str, code: int, session_keyring: Keyring
) -> None:
    with request_key_rule(f"/bin/keyctl reject %k 30 {error} %S") as prefix:
        name = unique()
        answer(KMSKEYS_PY, ["get", name, "--prefix", prefix])  # the negative key, if cached
        fast, slow = both(["get", name, "--prefix", prefix])
    assert fast.python
    assert (fast.code, fast.stdout) == (code, b"")
    assert fast.same() == slow.same()


@pytest.mark.upcall
def test_a_miss_goes_to_python_which_upcalls_once(session_keyring: Keyring, tmp_path: Path) -> None:
    # The C program searches without a callout, which never upcalls: the one upcall is the
    # Python CLI's, whose answer it prints; the next get is a hit, answered in C.
    calls = tmp_path / "calls"
    script = tmp_path / "resolve.sh"
    script.write_text(
        f'#!/bin/sh\necho "$2" >> {calls}\nexec keyctl instantiate "$1" kmst-v "$3"\n'
    )
    script.chmod(0o755)
    with request_key_rule(f"{script} %k %d %S") as prefix:
        name = unique()
        miss = answer(KMSKEYS, ["get", name, "--prefix", prefix])
        assert (miss.code, miss.stdout, miss.python) == (EXIT_OK, b"kmst-v", True)
        assert calls.read_text().splitlines() == [f"{prefix}:{name}"]
        hit = answer(KMSKEYS, ["get", name, "--prefix", prefix])
        assert (hit.code, hit.stdout, hit.stderr, hit.python) == (EXIT_OK, b"kmst-v", b"", False)
    assert calls.read_text().splitlines() == [f"{prefix}:{name}"]


FAILED_WRITES = {
    "closed pipe": b"kmskeys get: stdout: Broken pipe\n",
    "/dev/full": b"kmskeys get: stdout: No space left on device\n",
    "closed stdout": b"kmskeys get: stdout: Bad file descriptor\n",
}


@pytest.mark.parametrize("sink", FAILED_WRITES)
def test_a_failed_write_is_the_python_clis(sink: str, cached: tuple[str, str, bytes]) -> None:
    # Nothing written: the Python CLI gets the key again and meets the same failure, which it
    # reports in one line and exit code 1, never a traceback nor the secret.
    prefix, name, secret = cached
    results = []
    for command in (KMSKEYS, KMSKEYS_PY):
        kwargs: dict[str, object] = {}
        if sink == "closed pipe":
            read_end, out = os.pipe()
            os.close(read_end)
        elif sink == "closed stdout":
            out = os.open(os.devnull, os.O_WRONLY)
            kwargs["preexec_fn"] = lambda: os.close(1)
        else:
            out = os.open(sink, os.O_WRONLY)
        try:
            results.append(answer(command, ["get", name, "--prefix", prefix], stdout=out, **kwargs))
        finally:
            os.close(out)
    fast, slow = results
    assert fast.python
    assert (slow.code, slow.stderr) == (EXIT_ERROR, FAILED_WRITES[sink])
    assert fast.same() == slow.same()
    assert secret not in fast.stderr
