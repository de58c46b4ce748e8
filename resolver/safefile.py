"""Open root-owned files without following links, blocking on FIFOs or reading unbounded input.

The resolver runs as root on behalf of any local user: every file it trusts (config, credentials,
blobs) must be a regular file that only root can have written.
"""

from __future__ import annotations

import errno
import os
import stat

from kmskeys.trust import unsafe_reason
from resolver.errors import RefusedError, UnknownSecretError

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY | os.O_NOFOLLOW


def read_trusted(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """Read a root-owned regular file of at most `limit` bytes, or raise RefusedError."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang the handler; fstat then refuses it.
        # O_NOFOLLOW: the file root trusts is the one at this path, not wherever a link points.
        fd = os.open(path, _READ_FLAGS | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise RefusedError(f"{what} {os.fspath(path)} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefusedError(f"{what} {os.fspath(path)} is a symbolic link") from None
        raise RefusedError(f"{what} {os.fspath(path)}: {exc.strerror}") from None
    try:
        return _read_fd(fd, limit, f"{what} {os.fspath(path)}")
    finally:
        os.close(fd)


def _read_fd(fd: int, limit: int, what: str) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise RefusedError(f"{what} is not a regular file")
    reason = unsafe_reason(st)
    if reason:
        raise RefusedError(f"{what} is unsafe: {reason}")
    if st.st_size > limit:
        raise RefusedError(f"{what} is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise RefusedError(f"{what} is larger than {limit} bytes")
    return b"".join(chunks)


def read_below(root: str | os.PathLike[str], relative: str, limit: int, what: str) -> bytes:
    """Read `root/relative` one component at a time, never leaving `root` through a link.

    Every directory on the way and the file itself must be root-owned and not writable by
    group or others. A missing component is UnknownSecretError; anything unsafe is refused.
    """
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise RefusedError(f"{what} path {relative!r} has an empty, '.' or '..' segment")
    try:
        dir_fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        raise UnknownSecretError(f"blob_dir {os.fspath(root)} does not exist") from None
    except OSError as exc:
        raise RefusedError(f"blob_dir {os.fspath(root)}: {exc.strerror}") from None
    try:
        _check_dir(dir_fd, f"blob_dir {os.fspath(root)}")
        for index, part in enumerate(parts[:-1]):
            shown = "/".join(parts[: index + 1])
            next_fd = _open_component(part, dir_fd, _DIR_FLAGS, what, shown)
            os.close(dir_fd)
            dir_fd = next_fd
            _check_dir(dir_fd, f"{what} directory {shown!r}")
        fd = _open_component(parts[-1], dir_fd, _READ_FLAGS | os.O_NOFOLLOW, what, relative)
        try:
            return _read_fd(fd, limit, f"{what} {relative!r}")
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def _open_component(part: str, dir_fd: int, flags: int, what: str, shown: str) -> int:
    try:
        return os.open(part, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise UnknownSecretError(f"no {what} {shown!r}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefusedError(f"{what} {shown!r} is a symbolic link") from None
        # ENOTDIR and the like: never followed, never opened.
        raise RefusedError(f"{what} {shown!r}: {exc.strerror}") from None


def _check_dir(fd: int, what: str) -> None:
    reason = unsafe_reason(os.fstat(fd))
    if reason:
        raise RefusedError(f"{what} is unsafe: {reason}")
