"""A subordinate uid range of the test's own in the real /etc/subuid, removed afterwards.

The range lies far above any range useradd hands out (100000 + n x 65536 for n users) and is
random, so it collides neither with the host's ranges nor with another test's; below 2^31, so
that every requester helper can take its ids. Only the test's own line is added and removed,
under an flock of the file, and the file is rewritten in place (its owner and mode stay).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import user_keyrings

SUBUID = Path("/etc/subuid")
LOW, HIGH = 1_500_000_000, 2_000_000_000


def requester(uid: int) -> pwd.struct_passwd:
    """A passwd entry for a subordinate uid, which has none (as a container's uids)."""
    return pwd.struct_passwd((f"kmst{uid}", "x", uid, uid, "", "/", "/usr/sbin/nologin"))


@contextmanager
def subuid_range(owner: str, count: int) -> Iterator[list[int]]:
    """Add `owner:START:count` to /etc/subuid for the block; the range's uids."""
    start = LOW + secrets.randbelow((HIGH - LOW) // 65536) * 65536
    line = f"{owner}:{start}:{count}\n".encode()
    created = not SUBUID.exists()
    fd = os.open(SUBUID, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        with _locked(fd):
            text = os.pread(fd, 1 << 20, 0)
            os.write(fd, (b"\n" if text and not text.endswith(b"\n") else b"") + line)
        yield list(range(start, start + count))
    finally:
        user_keyrings.forget(range(start, start + count))
        with _locked(fd):
            text = os.pread(fd, 1 << 20, 0)
            kept = text.replace(line, b"", 1)
            os.ftruncate(fd, 0)
            os.write(fd, kept)
        os.close(fd)
        if created and not kept:
            SUBUID.unlink(missing_ok=True)


@contextmanager
def _locked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
