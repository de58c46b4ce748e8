"""`pass:` primitives: read one password-store entry as the requesting user, through gpg.

The resolver runs as root; the store and the GnuPG key belong to the requester (the kernel's
%u). So nothing here reads as root what the user could not read, and gpg never runs as root:

1. The entry is opened with the user's fsuid/fsgid (`_as_fs_user`), one path component at a time
   below the store root with O_NOFOLLOW, and every directory and the file must be owned by the
   user and writable by no one else. `pass show` follows any symbolic link (its only check is
   against `..` in the name); this is stricter: a link anywhere below the store root is refused,
   and so are hidden components (`.git`, `.extensions`). The store root itself may be a link
   (a synced store), but what it names must be owned by the user.
2. gpg runs with the user's uid, gid and groups, in a process group of its own, with a clean
   environment (the user's HOME, never the requester's environment), reading the opened entry
   on stdin. gpg rather than the `pass` script: no shell, no `PASSWORD_STORE_GPG_OPTS` or
   extensions, one process, and the file gpg reads is the file checked here.
3. It never asks for a passphrase: `--batch --no-tty --pinentry-mode error`, no GPG_TTY, DISPLAY
   or PINENTRY_USER_DATA, and `--no-autostart` (root never starts an agent for a user). A locked
   agent fails at once (gpg's ERROR status with GPG_ERR_NO_PIN_ENTRY); no agent at all is told
   apart from a missing key by asking the agent (`gpg-connect-agent --no-autostart /bye`).
4. Output is bounded (a `user` key holds at most 32767 bytes) and so is time: past the deadline
   the whole process group is killed. Plaintext is trusted only after gpg exits 0 having said
   DECRYPTION_OKAY: gpg writes plaintext before it checks the integrity tag.

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
import select
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

from kmskeys.contract import USER_PAYLOAD_MAX
from kmskeys.passname import PassQuery
from kmskeys.passname import select as select_part
from resolver.errors import RefusedError, UnavailableError, UnknownSecretError

if TYPE_CHECKING:
    from resolver.backend import Timings

GPG = "/usr/bin/gpg"
GPGCONF = "/usr/bin/gpgconf"
STORE_TEMPLATE = "{home}/.password-store"
GNUPG_TEMPLATE = "{home}/.gnupg"
ENTRY_SUFFIX = ".gpg"
# An entry's ciphertext: a 32767-byte entry plus OpenPGP overhead fits in well under this.
MAX_CIPHERTEXT = 256 * 1024
MAX_STATUS = 64 * 1024
PATH = "/usr/bin:/bin"

# libgpg-error codes (gpg-error.h) in gpg's `[GNUPG:] ERROR pkdecrypt_failed N` status; the
# code is N & 0xFFFF, the source (4 = gpg-agent) is in the top byte.
GPG_ERR_BAD_PASSPHRASE = 11
GPG_ERR_NO_AGENT = 77
GPG_ERR_NO_PIN_ENTRY = 85
GPG_ERR_PIN_ENTRY = 86
GPG_ERR_BAD_PIN = 87
GPG_ERR_CANCELED = 99
_LOCKED_CODES = frozenset(
    {GPG_ERR_BAD_PASSPHRASE, GPG_ERR_NO_PIN_ENTRY, GPG_ERR_PIN_ENTRY, GPG_ERR_BAD_PIN,
     GPG_ERR_CANCELED}
)  # fmt: skip
_ERR_CODE_MASK = 0xFFFF

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


def resolve(
    location: PassLocation,
    name: str,
    query: PassQuery,
    deadline: float,
    *,
    timings: Timings | None = None,
) -> bytes:
    """The part of entry `name` that `query` selects: 1..32767 bytes, or a ResolverError."""
    entry = read_entry(location, name, deadline, timings=timings)
    try:
        part = select_part(entry, query)
    except LookupError:
        raise PassRefusedError(
            f"pass entry {name!r} of {location.user} has no {query.field!r} field"
        ) from None
    if not part:
        raise PassRefusedError(
            f"the selected part of pass entry {name!r} of {location.user} is empty, "
            "which a key cannot hold"
        )
    return part


def read_entry(
    location: PassLocation,
    name: str,
    deadline: float,
    *,
    limit: int = USER_PAYLOAD_MAX,
    timings: Timings | None = None,
) -> bytes:
    """The whole decrypted entry `name` (validated by the caller), at most `limit` bytes."""
    start = time.perf_counter()
    fd = open_entry(location, name)
    try:
        return _decrypt(location, name, fd, deadline, limit)
    finally:
        os.close(fd)
        if timings is not None:
            timings.add("gpg", (time.perf_counter() - start) * 1000)


# --- opening the entry as the user ------------------------------------------------------------


@contextmanager
def _as_fs_user(uid: int, gid: int) -> Iterator[None]:
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
    with _as_fs_user(location.uid, location.gid):
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


# --- running gpg as the user ------------------------------------------------------------------


def gpg_argv(status_fd: int, gpg: str | None = None) -> list[str]:
    """gpg's command line: decrypt stdin to stdout, status lines on `status_fd`, never a prompt."""
    # No --quiet: gpg 2.2 with --quiet reports a locked agent as DECRYPTION_FAILED alone, without
    # the `ERROR pkdecrypt_failed` status line that says why (checked with gpg 2.2.40).
    return [
        gpg or GPG, "--no-options", "--batch", "--no-tty", "--no-autostart",
        "--no-auto-check-trustdb", "--no-permission-warning", "--pinentry-mode", "error",
        "--status-fd", str(status_fd), "--decrypt",
    ]  # fmt: skip


def _spawn(
    location: PassLocation, argv: list[str], stdin: int, stdout: int, pass_fds: tuple[int, ...]
) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            env=location.environment(),
            cwd="/",
            user=location.uid,
            group=location.gid,
            extra_groups=list(location.groups),
            umask=0o077,
            # Its own process group: a timeout kills gpg and anything it started.
            process_group=0,
            close_fds=True,
            pass_fds=pass_fds,
        )
    except FileNotFoundError:
        raise GpgMissingError(f"{argv[0]} is missing: install gnupg") from None
    except PermissionError:
        raise GpgMissingError(f"{argv[0]} cannot be run as {location.user}") from None
    except OSError as exc:
        # EAGAIN: the user is at RLIMIT_NPROC; anything else is the host's trouble too.
        raise UnavailableError(f"could not start gpg as {location.user}: {exc.strerror}") from None


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill gpg's whole process group and reap gpg."""
    if proc.returncode is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class _Output:
    """What gpg wrote: plaintext on stdout (bounded by `limit`), status lines (bounded)."""

    def __init__(self, limit: int) -> None:
        self.plain = bytearray()
        self.status = bytearray()
        self.limit = limit

    def wipe(self) -> None:
        self.plain[:] = bytes(len(self.plain))
        self.plain.clear()


def _collect(
    proc: subprocess.Popen[bytes], out_fd: int, status_fd: int, out: _Output, deadline: float
) -> str | None:
    """Read both pipes until EOF: None, or why reading stopped early ("timeout", "too large")."""
    poller = select.poll()
    open_fds = {out_fd: out.plain, status_fd: out.status}
    for fd in open_fds:
        poller.register(fd, select.POLLIN)
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        for fd, _event in poller.poll(left * 1000):
            buffer = open_fds[fd]
            cap = out.limit + 1 if fd == out_fd else MAX_STATUS + 1
            chunk = os.read(fd, max(1, min(65536, cap - len(buffer))))
            if not chunk:
                poller.unregister(fd)
                del open_fds[fd]
                continue
            buffer += chunk
            if len(buffer) >= cap:
                return "too large" if fd == out_fd else "status too long"
    left = deadline - time.monotonic()
    try:
        proc.wait(max(0.0, left))
    except subprocess.TimeoutExpired:
        return "timeout"
    return None


def _decrypt(location: PassLocation, name: str, fd: int, deadline: float, limit: int) -> bytes:
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    out = _Output(limit)
    try:
        proc = _spawn(location, gpg_argv(status_w), fd, out_w, (status_w,))
    except BaseException:
        for end in (out_r, out_w, status_r, status_w):
            os.close(end)
        raise
    os.close(out_w)
    os.close(status_w)
    try:
        stopped = _collect(proc, out_r, status_r, out, deadline)
    finally:
        _kill(proc)
        os.close(out_r)
        os.close(status_r)
    try:
        status = bytes(out.status)
        _classify(location, name, proc.returncode, stopped, status, deadline=deadline, limit=limit)
        return bytes(out.plain)
    finally:
        out.wipe()


def status_lines(status: bytes) -> list[list[str]]:
    """gpg's `[GNUPG:] KEYWORD ARGS...` lines, split into words."""
    lines = []
    for raw in status.decode("ascii", "replace").splitlines():
        if raw.startswith("[GNUPG:] "):
            lines.append(raw[len("[GNUPG:] ") :].split())
    return lines


def _classify(
    location: PassLocation,
    name: str,
    returncode: int | None,
    stopped: str | None,
    status: bytes,
    *,
    deadline: float,
    limit: int,
) -> None:
    """Raise the class of a failed decryption; return if gpg decrypted and verified the entry."""
    who = f"pass entry {name!r} of {location.user}"
    if stopped == "too large":
        raise PassRefusedError(
            f"{who} is larger than {limit} bytes, which a key cannot hold; keep the secret in "
            "an entry of its own"
        )
    if stopped == "timeout":
        raise UnavailableError(f"gpg did not finish decrypting {who} before the deadline")
    if stopped is not None:
        raise PassRefusedError(f"gpg wrote more status than expected for {who}")
    lines = status_lines(status)
    keywords = {line[0] for line in lines if line}
    if returncode == 0 and "DECRYPTION_OKAY" in keywords and "DECRYPTION_FAILED" not in keywords:
        return
    for line in lines:
        if line[:2] == ["ERROR", "pkdecrypt_failed"] and len(line) > 2 and line[2].isdigit():
            code = int(line[2]) & _ERR_CODE_MASK
            if code in _LOCKED_CODES:
                raise AgentLockedError(
                    f"{location.user}'s gpg-agent is locked (it would need a passphrase to "
                    f"decrypt {name!r}): unlock it in your session, e.g. `pass show {name}` "
                    "once, then ask again"
                )
            if code == GPG_ERR_NO_AGENT:
                raise _not_running(location)
    if "NO_SECKEY" in keywords:
        if not _agent_answers(location, deadline):
            raise _not_running(location)
        raise PassRefusedError(f"{who} is encrypted to a key {location.user}'s agent does not hold")
    if "NODATA" in keywords or "DECRYPTION_FAILED" in keywords or "BADMDC" in keywords:
        raise PassRefusedError(f"{who} is not a valid OpenPGP message, or it is damaged")
    raise PassRefusedError(f"gpg could not decrypt {who} (exit status {returncode})")


def _not_running(location: PassLocation) -> AgentNotRunningError:
    return AgentNotRunningError(
        f"no gpg-agent runs for {location.user}: log in (your session starts it) and unlock it, "
        "e.g. with `pass show` once, then ask again"
    )


def _agent_answers(location: PassLocation, deadline: float) -> bool:
    """Whether an agent answers at the socket gpg uses for the user (never starting one).

    `gpg-connect-agent --no-autostart` exits 0 even when no agent runs, so: ask gpgconf (as the
    user) where the socket is, connect to it with the user's file access and read the greeting.
    """
    path = _agent_socket(location, deadline)
    if path is None:
        return False
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            with _as_fs_user(location.uid, location.gid):
                sock.connect(path)
            return sock.recv(64).startswith(b"OK")
        except TimeoutError:
            raise UnavailableError(
                f"{location.user}'s gpg-agent did not answer before the deadline"
            ) from None
        except OSError:
            return False


def _agent_socket(location: PassLocation, deadline: float) -> str | None:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    argv = [GPGCONF, "--homedir", location.gnupg_home, "--list-dirs", "agent-socket"]
    try:
        proc = _spawn(location, argv, subprocess.DEVNULL, write_end, ())
    finally:
        os.close(write_end)
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
        answer = os.read(read_end, 4096).decode("utf-8", "replace").strip()
    except subprocess.TimeoutExpired:
        raise UnavailableError(f"gpgconf did not answer for {location.user} in time") from None
    finally:
        _kill(proc)
        os.close(read_end)
    return answer if proc.returncode == 0 and answer.startswith("/") else None


__all__ = [
    "GNUPG_TEMPLATE",
    "STORE_TEMPLATE",
    "AgentLockedError",
    "AgentNotRunningError",
    "GpgMissingError",
    "PassEntryMissing",
    "PassLocation",
    "PassRefusedError",
    "gpg_argv",
    "locate",
    "open_entry",
    "read_entry",
    "resolve",
    "status_lines",
]
