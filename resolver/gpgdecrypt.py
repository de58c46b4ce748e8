"""Running gpg as the requesting user: decrypt one opened `pass:` entry, bounded, never a prompt.

The other half of resolver/passentry.py (which finds and opens the entry as the user). gpg
rather than the `pass` script: no shell, no `PASSWORD_STORE_GPG_OPTS` or extensions, one
process, and the file gpg reads (on its stdin) is the file passentry checked.

- gpg runs with the user's uid, gid and groups, in a process group of its own, with a clean
  environment (PassLocation.environment: the user's HOME, never the requester's environment).
- It never asks for a passphrase: `--batch --no-tty --pinentry-mode error`, no GPG_TTY, DISPLAY
  or PINENTRY_USER_DATA, and `--no-autostart` (root never starts an agent for a user). A locked
  agent fails at once (gpg's ERROR status with GPG_ERR_NO_PIN_ENTRY); no agent at all is told
  apart from a missing key by connecting to the socket gpgconf names for the user.
- Output is bounded (a `user` key holds at most 32767 bytes) and so is time: past the deadline
  the whole process group is killed. Plaintext is trusted only after gpg exits 0 having said
  DECRYPTION_OKAY: gpg writes plaintext before it checks the integrity tag.

Messages name the entry and the user, never a byte of the entry.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from contextlib import suppress

from resolver.errors import UnavailableError
from resolver.passentry import (
    AgentLockedError,
    AgentNotRunningError,
    GpgMissingError,
    PassLocation,
    PassRefusedError,
    as_fs_user,
)

GPG = "/usr/bin/gpg"
MAX_STATUS = 64 * 1024

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


def gpgconf_for(gpg: str) -> str:
    """The gpgconf next to `gpg` (GnuPG installs them side by side)."""
    return os.path.join(os.path.dirname(gpg), "gpgconf")


def gpg_argv(status_fd: int, gpg: str = GPG) -> list[str]:
    """gpg's command line: decrypt stdin to stdout, status lines on `status_fd`, never a prompt."""
    # No --quiet: gpg 2.2 with --quiet reports a locked agent as DECRYPTION_FAILED alone, without
    # the `ERROR pkdecrypt_failed` status line that says why (checked with gpg 2.2.40).
    return [
        gpg, "--no-options", "--batch", "--no-tty", "--no-autostart",
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


def decrypt(
    location: PassLocation, name: str, fd: int, deadline: float, *, limit: int, gpg: str = GPG
) -> bytes:
    """The plaintext of the entry open on `fd` (at most `limit` bytes), or the failure's class."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    out = _Output(limit)
    try:
        proc = _spawn(location, gpg_argv(status_w, gpg), fd, out_w, (status_w,))
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
        _classify(
            location,
            name,
            proc.returncode,
            stopped,
            status,
            deadline=deadline,
            limit=limit,
            gpg=gpg,
        )
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
    gpg: str = GPG,
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
        if not _agent_answers(location, deadline, gpg):
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


def _agent_answers(location: PassLocation, deadline: float, gpg: str = GPG) -> bool:
    """Whether an agent answers at the socket gpg uses for the user (never starting one).

    `gpg-connect-agent --no-autostart` exits 0 even when no agent runs, so: ask gpgconf (as the
    user) where the socket is, connect to it with the user's file access and read the greeting.
    """
    path = _agent_socket(location, deadline, gpg)
    if path is None:
        return False
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            with as_fs_user(location.uid, location.gid):
                sock.connect(path)
            return sock.recv(64).startswith(b"OK")
        except TimeoutError:
            raise UnavailableError(
                f"{location.user}'s gpg-agent did not answer before the deadline"
            ) from None
        except OSError:
            return False


def _agent_socket(location: PassLocation, deadline: float, gpg: str) -> str | None:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    argv = [gpgconf_for(gpg), "--homedir", location.gnupg_home, "--list-dirs", "agent-socket"]
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


__all__ = ["GPG", "decrypt", "gpg_argv", "gpgconf_for", "status_lines"]
