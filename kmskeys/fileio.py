"""Trusted files, opened one way: what root reads or writes on behalf of every local user.

One helper per file pattern (systemd `fileio.c`, `tmpfile-util.c`): open a trusted directory,
open or read a trusted file, read a file below a trusted directory one component at a time,
check a path by its stat alone, and write a temp file that is fsync'd, then linked or renamed
in. Flags choose the variant; callers never re-implement `O_NOFOLLOW` checks or atomic writes.

"Trusted" is kmskeys.trust.unsafe_reason (owned by root, writable by nobody else), plus, with
PRIVATE, no group or other bits at all. Every refusal is an UntrustedFileError whose `problem`
is one word that `kmskeys-resolver check` and doctor report as they are; an I/O failure of a
file that is trusted stays an OSError.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import suppress

from kmskeys.errors import KmsKeysError
from kmskeys.trust import unsafe_reason

# Flags.
FOLLOW = 1  # the last component may be a symbolic link (a root-owned one, as root's choice)
PRIVATE = 2  # no group or other bits at all: 0700 directories, 0600 files
CREATE = 4  # create what is missing: a directory 0700, a file 0600 (never through a link)
WRITE = 8  # open a file for reading and writing (a lock or state file)

# Kinds of file (stat.S_IFMT values).
REGULAR = stat.S_IFREG
DIRECTORY = stat.S_IFDIR
SOCKET = stat.S_IFSOCK

# Problems: the words selfcheck and doctor report.
MISSING = "missing"
SYMLINK = "symlink"
NOT_REGULAR = "not-regular"
NOT_DIRECTORY = "not-dir"
NOT_SOCKET = "not-socket"
UNSAFE = "unsafe"
TOO_LARGE = "too-large"
UNREADABLE = "unreadable"

_KINDS = {
    stat.S_IFREG: ("a regular file", NOT_REGULAR),
    stat.S_IFDIR: ("a directory", NOT_DIRECTORY),
    stat.S_IFSOCK: ("a socket", NOT_SOCKET),
}
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must never hang root; the type check then refuses it.
_FILE = os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class UntrustedFileError(KmsKeysError):
    """Root refuses a file or directory it would trust (config, blob, keystore, state, socket):
    the message says why; make it root-owned and not writable by others (docs/security.md)."""

    def __init__(self, label: str, problem: str, detail: str, path: str = "") -> None:
        super().__init__(f"{label} {detail}")
        self.label = label
        self.problem = problem
        self.detail = detail
        # The path refused, as given (relative to a directory fd for a component).
        self.path = path


def check_stat(st: os.stat_result, label: str, kind: int, flags: int = 0, path: str = "") -> None:
    """Refuse unless `st` is of `kind` (REGULAR, DIRECTORY, SOCKET) and trusted."""
    if stat.S_IFMT(st.st_mode) != kind:
        what, problem = _KINDS[kind]
        raise UntrustedFileError(label, problem, f"is not {what}", path)
    reason = unsafe_reason(st)
    if reason is None and flags & PRIVATE and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = stat.S_IMODE(st.st_mode)
        if kind == stat.S_IFDIR:
            reason = f"open to group or others (mode {mode:04o}, want 0700)"
        else:
            reason = f"readable by group or others (mode {mode:04o}, want 0600)"
    if reason is not None:
        raise UntrustedFileError(label, UNSAFE, f"is unsafe: {reason}", path)


def check_path(path: str | os.PathLike[str], label: str, kind: int, flags: int = 0) -> None:
    """Check what is at `path` by its stat (lstat unless FOLLOW), for files opened by others
    (botocore's credentials file, a socket to connect to)."""
    try:
        st = os.stat(path) if flags & FOLLOW else os.lstat(path)
    except OSError as exc:
        raise _refusal(exc, label, path, None, kind) from None
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedFileError(label, SYMLINK, "is a symbolic link", os.fspath(path))
    check_stat(st, label, kind, flags, os.fspath(path))


def open_dir(
    path: str | os.PathLike[str], label: str, flags: int = 0, *, dir_fd: int | None = None
) -> int:
    """An fd of a trusted directory (relative to `dir_fd` when given); CREATE makes it 0700."""
    open_flags = _DIR | (0 if flags & FOLLOW else os.O_NOFOLLOW)
    try:
        fd = os.open(path, open_flags, dir_fd=dir_fd)
    except FileNotFoundError:
        if not flags & CREATE:
            raise UntrustedFileError(label, MISSING, "does not exist", os.fspath(path)) from None
        _make_dir(path, dir_fd)
        return open_dir(path, label, flags & ~CREATE, dir_fd=dir_fd)
    except OSError as exc:
        raise _refusal(exc, label, path, dir_fd, stat.S_IFDIR) from None
    return _checked(fd, label, stat.S_IFDIR, flags, os.fspath(path))


def open_file(
    path: str | os.PathLike[str], label: str, flags: int = 0, *, dir_fd: int | None = None
) -> int:
    """An fd of a trusted regular file; WRITE opens it read-write, CREATE makes it 0600."""
    open_flags = _FILE | (os.O_RDWR if flags & WRITE else os.O_RDONLY)
    open_flags |= (os.O_CREAT if flags & CREATE else 0) | (0 if flags & FOLLOW else os.O_NOFOLLOW)
    try:
        fd = os.open(path, open_flags, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise _refusal(exc, label, path, dir_fd, stat.S_IFREG) from None
    return _checked(fd, label, stat.S_IFREG, flags, os.fspath(path))


def read_file(
    path: str | os.PathLike[str],
    limit: int,
    label: str,
    flags: int = 0,
    *,
    dir_fd: int | None = None,
) -> bytes:
    """The bytes of a trusted regular file of at most `limit` bytes."""
    fd = open_file(path, label, flags & ~(WRITE | CREATE), dir_fd=dir_fd)
    try:
        return read_fd(fd, limit, label)
    finally:
        os.close(fd)


def read_fd(fd: int, limit: int, label: str) -> bytes:
    """At most `limit` bytes from an open file, refusing more (the size may grow meanwhile)."""
    if os.fstat(fd).st_size > limit:
        raise UntrustedFileError(label, TOO_LARGE, f"is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise UntrustedFileError(label, TOO_LARGE, f"is larger than {limit} bytes")
    return b"".join(chunks)


def read_below(
    root: str | os.PathLike[str], relative: str, limit: int, root_label: str, what: str
) -> bytes:
    """Read `root/relative` one component at a time, never leaving `root` through a link.

    `root` itself may be a link (root's own choice); every directory on the way and the file
    must be trusted. Labels: `root_label` for root, `WHAT 'a/b'` below it.
    """
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UntrustedFileError(
            f"{what} path {relative!r}", UNSAFE, "has an empty, '.' or '..' segment"
        )
    dir_fd = open_dir(root, root_label, FOLLOW)
    try:
        for index, part in enumerate(parts[:-1]):
            shown = "/".join(parts[: index + 1])
            next_fd = open_dir(part, f"{what} directory {shown!r}", dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        return read_file(parts[-1], limit, f"{what} {relative!r}", dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Replace `path` with `data`, root-owned with `mode`: a temp file beside it, fsync'd,
    renamed over it, then the directory fsync'd. Readers see the old file or the new one."""
    directory, name = os.path.split(os.path.abspath(path))
    dir_fd = os.open(directory, _DIR)
    try:
        temp = _write_temp(dir_fd, name, data, mode)
        try:
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_new(
    dir_fd: int, name: str, data: bytes, mode: int = 0o600, *, durable: bool = True
) -> bool:
    """Write `data` as `name` in `dir_fd` unless that name exists; True if this call wrote it.
    link(), not rename(): of concurrent writers exactly one wins, never replaced. `durable`:
    fsync'd, file and directory; without, for state that must not outlive a reboot anyway
    (a reader of a file a crash cut short finds it garbled: it must refuse such content)."""
    temp = _write_temp(dir_fd, name, data, mode, durable)
    try:
        os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        won = True
    except FileExistsError:
        won = False
    finally:
        with suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
    if durable:
        os.fsync(dir_fd)  # the new name, and the temp's removal, reach the disk
    return won


TEMP_PREFIX = ".tmp-"


def _write_temp(dir_fd: int, name: str, data: bytes, mode: int, durable: bool = True) -> str:
    """A new temp file in `dir_fd` holding `data`, root-owned with `mode`, fsync'd if
    `durable`."""
    # os.urandom, not secrets: that would import hashlib and OpenSSL (ms) on the miss path.
    temp = f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600, dir_fd=dir_fd)
    try:
        try:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    return temp


def _make_dir(path: str | os.PathLike[str], dir_fd: int | None) -> None:
    try:
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        return  # a concurrent creator made it
    # Any other failure (ENOSPC, EROFS) is the caller's to classify: an OSError, no refusal.
    if dir_fd is not None:
        os.fsync(dir_fd)  # the new directory's name must survive a crash too


def _checked(fd: int, label: str, kind: int, flags: int, path: str) -> int:
    try:
        check_stat(os.fstat(fd), label, kind, flags, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(
    exc: OSError,
    label: str,
    path: str | os.PathLike[str],
    dir_fd: int | None,
    kind: int,
) -> UntrustedFileError:
    """The refusal for a failed open of `path`: what is there, or the errno's words."""
    shown = os.fspath(path)
    if isinstance(exc, FileNotFoundError):
        return UntrustedFileError(label, MISSING, "does not exist", shown)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR):
        # O_NOFOLLOW refuses a link with ELOOP (ENOTDIR with O_DIRECTORY); a socket is ENXIO.
        try:
            found = os.lstat(path, dir_fd=dir_fd).st_mode
        except OSError:
            found = 0
        if stat.S_ISLNK(found):
            return UntrustedFileError(label, SYMLINK, "is a symbolic link", shown)
        if found and stat.S_IFMT(found) != kind:
            what, problem = _KINDS[kind]
            return UntrustedFileError(label, problem, f"is not {what}", shown)
    return UntrustedFileError(label, UNREADABLE, f"cannot be opened ({exc.strerror})", shown)
