"""`pass:` entries as the requesting user: where the store is, opening one entry, the errors.

The resolver runs as root; the store and the GnuPG key belong to the requester (the kernel's
%u). So nothing here reads as root what the user could not read, and gpg never runs as root:

1. The entry is opened with the user's fsuid/fsgid (`as_fs_user`), one path component at a time
   below the store root with O_NOFOLLOW, and every directory and the file must be owned by the
   user and writable by no one else. `pass show` follows any symbolic link (its only check is
   against `..` in the name); this is stricter: a link anywhere below the store root is refused,
   and so are hidden components (`.git`, `.extensions`). The store root itself may be a link
   (a synced store), but what it names must be owned by the user.
2. gpg decrypts the opened file as the user (resolver/gpgdecrypt.py: the user's ids, a clean
   environment, never a prompt, bounded output and time); resolver/passstore.py puts the two
   together.

gpg finds the agent as it does in the user's session, from its uid and home: with the default
home, /run/user/UID/gnupg/S.gpg-agent when /run/user/UID (made by logind, owned by the uid, mode
0700) exists, else GNUPGHOME/S.gpg-agent; with another home, a `d.HASH` directory below
/run/user/UID/gnupg. So GNUPGHOME is set only when the configured home is not the default one.

Messages name the entry and the user, never a byte of the entry.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from kmskeys.contract import USER_PAYLOAD_MAX
from resolver.errors import RefusedError, UnavailableError, UnknownSecretError

STORE_TEMPLATE = "{home}/.password-store"
GNUPG_TEMPLATE = "{home}/.gnupg"
ENTRY_SUFFIX = ".gpg"
# An entry's ciphertext: a 32767-byte entry plus OpenPGP overhead fits in well under this.
MAX_CIPHERTEXT = 256 * 1024
PATH = "/usr/bin:/bin"

_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY
_FILE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


class PassEntryMissing(UnknownSecretError):
    """No such entry in the user's password store (ENOKEY): `pass insert NAME` first."""

    outcome = "unknown"


class PassRefusedError(RefusedError):
    """The entry cannot be served (EKEYREJECTED): unsafe store, a link, another uid's files,
    too large, no such field, or encrypted to a key the user's agent does not hold."""


class AgentLockedError(UnavailableError):
    """The user's gpg-agent would need a passphrase (EAGAIN): unlock it in your session, e.g.
    `pass show NAME` once or `gpg-connect-agent /bye` after a pinentry; then ask again."""

    outcome = "locked"
    # The user's own state, not an outage: no alarm.
    alarm = False


class AgentNotRunningError(AgentLockedError):
    """No gpg-agent runs for the user (EAGAIN): log in (the session starts it) and unlock it."""


class GpgMissingError(UnavailableError):
    """gpg cannot be run (EAGAIN): install Debian's gnupg package on this host."""


class PassLocation:
    """Where one user's store and GnuPG home are, and who reads them."""

    __slots__ = ("gid", "gnupg_home", "groups", "home", "store_dir", "uid", "user")

    def __init__(  # noqa: PLR0917 - the seven facts of one location, all required
        self,
        uid: int,
        gid: int,
        user: str,
        home: str,
        store_dir: str,
        gnupg_home: str,
        groups: tuple[int, ...] = (),
    ) -> None:
        self.uid, self.gid, self.user, self.home = uid, gid, user, home
        self.store_dir, self.gnupg_home, self.groups = store_dir, gnupg_home, groups

    def __repr__(self) -> str:
        return (
            f"PassLocation(uid={self.uid}, user={self.user!r}, store_dir={self.store_dir!r}, "
            f"gnupg_home={self.gnupg_home!r})"
        )

    def environment(self) -> dict[str, str]:
        """gpg's whole environment: the user's identity and home, C messages, nothing else."""
        env = {"HOME": self.home, "USER": self.user, "LOGNAME": self.user}
        env.update({"PATH": PATH, "LC_ALL": "C"})
        if os.path.normpath(self.gnupg_home) != os.path.join(os.path.normpath(self.home), ".gnupg"):
            env["GNUPGHOME"] = self.gnupg_home
        return env


def locate(
    uid: int, *, store_template: str = STORE_TEMPLATE, gnupg_template: str = GNUPG_TEMPLATE
) -> PassLocation:
    """The location of `uid`'s store from the passwd database and root's templates.

    Templates come from root's config only ({home}, {user}, {uid}); never from the requester's
    environment, which the resolver does not even see.
    """
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise PassRefusedError(f"uid {uid} has no passwd entry, so no home and no store") from None
    fields = {"home": entry.pw_dir, "user": entry.pw_name, "uid": str(uid)}
    store, gnupg = store_template.format(**fields), gnupg_template.format(**fields)
    for what, path in (("store_dir", store), ("gnupg_home", gnupg), ("home", entry.pw_dir)):
        if not os.path.isabs(path):
            raise PassRefusedError(f"the pass {what} of uid {uid} is not absolute: {path!r}")
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        groups = (entry.pw_gid,)
    return PassLocation(uid, entry.pw_gid, entry.pw_name, entry.pw_dir, store, gnupg, groups)


# --- opening the entry as the user ------------------------------------------------------------


@contextmanager
def as_fs_user(uid: int, gid: int) -> Iterator[None]:
    """Open files as uid/gid: the fsuid and fsgid of this thread only, restored afterwards.

    Kernel facts: setfsuid/setfsgid change the calling thread's credentials only (glibc does
    not broadcast them to other threads, unlike setuid); a non-zero fsuid drops CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH and CAP_FOWNER from the effective set, and going back to 0 restores
    them. The supplementary groups stay root's (usually none under request-key).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.setfsgid(gid)
    libc.setfsuid(uid)
    try:
        # They report no error: ask again (-1 is never a valid id, so it changes nothing).
        if libc.setfsuid(-1) != uid or libc.setfsgid(-1) != gid:
            raise PassRefusedError(f"could not take uid {uid}'s file access (setfsuid)")
        yield
    finally:
        libc.setfsuid(0)
        libc.setfsgid(0)


def open_entry(location: PassLocation, name: str) -> int:
    """An fd of STORE/NAME.gpg, opened as the user; every component checked (module docstring)."""
    parts = name.split("/")
    if any(not part or part.startswith(".") for part in parts):
        raise PassRefusedError(f"pass entry {name!r}: hidden or empty path components are refused")
    who = location.user
    with as_fs_user(location.uid, location.gid):
        _check_home(location)
        try:
            dir_fd = os.open(location.store_dir, _DIR_FLAGS)
        except FileNotFoundError:
            raise PassEntryMissing(f"{who} has no password store at {location.store_dir}") from None
        except OSError as exc:
            raise PassRefusedError(f"password store of {who}: {exc.strerror}") from None
        try:
            _check_owned(dir_fd, location.uid, f"password store of {who}")
            for index, part in enumerate(parts[:-1]):
                shown = "/".join(parts[: index + 1])
                next_fd = _open_below(dir_fd, part, _DIR_FLAGS | os.O_NOFOLLOW, name, shown)
                os.close(dir_fd)
                dir_fd = next_fd
                _check_owned(dir_fd, location.uid, f"pass directory {shown!r} of {who}")
            fd = _open_below(dir_fd, parts[-1] + ENTRY_SUFFIX, _FILE_FLAGS, name, name)
        finally:
            os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PassRefusedError(f"pass entry {name!r} of {who} is not a regular file")
        _check_owned(fd, location.uid, f"pass entry {name!r} of {who}", st)
        if st.st_size > MAX_CIPHERTEXT:
            raise PassRefusedError(
                f"pass entry {name!r} of {who} is {st.st_size} bytes of ciphertext; an entry a "
                f"key can hold ({USER_PAYLOAD_MAX} bytes) is far smaller"
            )
        # gpg reads it blocking; the O_NONBLOCK was for the open (a FIFO must not hang it).
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_home(location: PassLocation) -> None:
    try:
        st = os.stat(location.gnupg_home)
    except FileNotFoundError:
        raise PassRefusedError(
            f"{location.user} has no GnuPG home at {location.gnupg_home}"
        ) from None
    except OSError as exc:
        raise PassRefusedError(f"GnuPG home of {location.user}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PassRefusedError(f"GnuPG home of {location.user} is not a directory")
    _check_stat(st, location.uid, f"GnuPG home of {location.user}")


def _open_below(dir_fd: int, part: str, flags: int, name: str, shown: str) -> int:
    try:
        return os.open(part, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise PassEntryMissing(f"no pass entry {name!r} ({shown!r} does not exist)") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(dir_fd, part):
            raise PassRefusedError(
                f"pass entry {name!r}: {shown!r} is a symbolic link, which kmskeys never "
                "follows below the store root"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise PassEntryMissing(
                f"no pass entry {name!r} ({shown!r} is not a directory)"
            ) from None
        raise PassRefusedError(f"pass entry {name!r}: {shown!r}: {exc.strerror}") from None


def _is_link(dir_fd: int, part: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _check_owned(fd: int, uid: int, what: str, st: os.stat_result | None = None) -> None:
    _check_stat(st or os.fstat(fd), uid, what)


def _check_stat(st: os.stat_result, uid: int, what: str) -> None:
    if st.st_uid != uid:
        raise PassRefusedError(f"{what} is owned by uid {st.st_uid}, not by the requester")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PassRefusedError(
            f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        )


__all__ = [
    "GNUPG_TEMPLATE",
    "STORE_TEMPLATE",
    "AgentLockedError",
    "AgentNotRunningError",
    "GpgMissingError",
    "PassEntryMissing",
    "PassLocation",
    "PassRefusedError",
    "as_fs_user",
    "locate",
    "open_entry",
]
