"""The private filesystem of `kmskeys exec --file`: a ramfs mounted nowhere, held by one fd.

systemd hands a service its credentials in a private ramfs it mounts under /run/credentials
(`$CREDENTIALS_DIRECTORY`) and removes when the service stops. `kmskeys exec` leaves no process
behind to remove anything, so the filesystem is never mounted at all: fsopen(2) + fsmount(2)
make a detached mount whose only way in is a file descriptor the command inherits, and
`$CREDENTIALS_DIRECTORY` is `/proc/self/fd/N`, a path that resolves through that descriptor in
the command and in every child that inherits it. The kernel frees the filesystem, files and all,
when the last descriptor closes: nothing to clean up, nothing left if the command is killed.
With `--watch`, the parent keeps a descriptor too, to replace a file atomically when its secret
changes (`replace_file`); it closes it when it ends, and the command's copy lives on with it.

ramfs, as systemd prefers, because its pages are never swapped out; tmpfs where ramfs is not
available. Making a filesystem needs CAP_SYS_ADMIN over one's mount namespace: root has it; any
other user gets it in a user + mount namespace of its own, made by a short-lived helper process,
so the command itself stays in the host's namespaces (its uid, keyrings and setuid programs work
as before). Hosts that forbid unprivileged user namespaces get `PrivateFsUnavailableError`.
"""

from __future__ import annotations

import os
import socket
from contextlib import suppress

from kmskeys.lowlevel import process


class PrivateFsUnavailableError(OSError):
    """No private filesystem could be made for --file here; use --env, or run as root."""


def _make() -> int:
    try:
        return process.private_fs(b"ramfs", None)
    except OSError:
        return process.private_fs(b"tmpfs", b"4m")


def _make_in_user_namespace(uid: int, gid: int, sock: socket.socket) -> None:
    # In the helper child only: it alone enters the new namespaces.
    process.unshare(process.CLONE_NEWUSER | process.CLONE_NEWNS)
    for path, text in (
        ("/proc/self/setgroups", "deny"),  # required before an unprivileged gid_map
        ("/proc/self/uid_map", f"{uid} {uid} 1"),
        ("/proc/self/gid_map", f"{gid} {gid} 1"),
    ):
        with open(path, "w") as file:
            file.write(text)
    socket.send_fds(sock, [b"ok"], [_make()])


def private_fs() -> int:
    """The O_PATH, close-on-exec fd of the root (mode 0700, owned by this fsuid) of a new fs."""
    if os.geteuid() == 0:
        try:
            return _make()
        except OSError as exc:
            raise PrivateFsUnavailableError(
                exc.errno,
                f"cannot make a private filesystem for --file: {exc.strerror} (a container "
                "without CAP_SYS_ADMIN, or a seccomp profile that blocks fsopen(2), Linux "
                "5.2+); use --env",
            ) from None
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the helper exits without returning
            code = 0
            try:
                parent.close()
                _make_in_user_namespace(os.geteuid(), os.getegid(), child)
            except OSError as exc:
                child.sendall(f"{exc.errno or 0}".encode())
                code = 1
            finally:
                os._exit(code)
        child.close()
        message, fds, _, _ = socket.recv_fds(parent, 64, 1)
        os.waitpid(pid, 0)
    finally:
        parent.close()
        child.close()
    if fds:
        return fds[0]
    err = int(message or b"0")
    raise PrivateFsUnavailableError(
        err,
        "cannot make a private filesystem for --file: this host does not let user "
        f"{os.geteuid()} create a user namespace ({os.strerror(err)}; see "
        "kernel.unprivileged_userns_clone, user.max_user_namespaces, or AppArmor's "
        "apparmor_restrict_unprivileged_userns); use --env, or run kmskeys exec as root",
    )


def write_file(root: int, name: str, data: bytes) -> None:
    """Create root/name, mode 0400, holding data (the caller made sure name is one segment)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o400, dir_fd=root)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


# `kmskeys exec --watch` replaces a file under this name, then renames it into place. No
# credential file name starts with "." (kmskeys/exec_plan.py), so it never clashes with one.
_IN_FLIGHT = ".kmskeys-new"


def replace_file(root: int, name: str, data: bytes) -> None:
    """Replace root/name with `data` atomically: a reader opens the old file or the new, whole.

    The directory is read-only (0500) once sealed: it is made writable for the moment of the
    write and sealed again, whatever happens. A reader that has the old file open keeps reading
    the old bytes; the filesystem frees them when it closes it.
    """
    with _writable(root):
        with suppress(FileNotFoundError):
            os.unlink(_IN_FLIGHT, dir_fd=root)  # left by a write that failed half-way
        try:
            write_file(root, _IN_FLIGHT, data)
            os.rename(_IN_FLIGHT, name, src_dir_fd=root, dst_dir_fd=root)
        except BaseException:
            with suppress(OSError):
                os.unlink(_IN_FLIGHT, dir_fd=root)
            raise


def remove_file(root: int, name: str) -> None:
    """Remove root/name, if it is there."""
    with _writable(root), suppress(FileNotFoundError):
        os.unlink(name, dir_fd=root)


class _writable:
    """The sealed directory at mode 0700 inside the block, back to 0500 after it."""

    def __init__(self, root: int) -> None:
        self.root = root

    def __enter__(self) -> None:
        os.chmod(".", 0o700, dir_fd=self.root)

    def __exit__(self, *exc: object) -> None:
        os.chmod(".", 0o500, dir_fd=self.root)


def seal(root: int) -> str:
    """Make the directory read-only (0500) and return the path the command will use for it."""
    path = f"/proc/self/fd/{root}"
    os.chmod(path, 0o500)
    return path
