"""Probe whether this host runs /sbin/request-key for a miss: for root, and for a non-root uid.

Some hosts refuse the upcall for requesters without privilege: request_key(2) fails at once
with ENOENT and request-key never runs, so a non-root app's miss can never resolve. Presence
of the binary and the rule says nothing about that; only a request does.

Each case runs in a forked child that takes the case's identity, joins a new session keyring
and requests `PREFIX:CASE` under a throwaway rule in /etc/request-key.d whose program records
its own invocation (with the %u the kernel passed) and instantiates the key. Writing the rule
needs root. The rule, the temporary directory and the keys are gone afterwards, even when a
case fails or hangs. Stdlib and the keyutils binding only: `kmskeys doctor` runs this too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import secrets
import select
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kmskeys import keyutils
from kmskeys.errors import KeyctlError

REQUEST_KEY_D = Path("/etc/request-key.d")
PROBE_PAYLOAD = b"kmskeys-probe"
DEFAULT_TIMEOUT = 5.0

# request-key splits the rule's program line on whitespace and has no quoting.
_RULE = "create user {prefix}:* * {script} %k %u %d %S\n"
_SCRIPT = """#!/bin/sh
# Throwaway upcall probe: record who asked, then answer.
echo "$3 $2" >> {calls}
exec {keyctl} instantiate "$1" {payload} "$4"
"""


@dataclass(frozen=True)
class UpcallOutcome:
    """What one probe request did: whether request-key ran, with which %u, and the result."""

    ran: bool
    uid: int | None
    error: str | None  # the errno name request_key(2) or the read failed with; None: success

    @property
    def works(self) -> bool:
        """request-key ran and the requester got the key it instantiated."""
        return self.ran and self.error is None

    def __str__(self) -> str:
        if self.works:
            return f"yes (request-key ran with %u={self.uid})"
        ran = f"request-key ran with %u={self.uid}" if self.ran else "request-key never ran"
        return f"no (request_key: {self.error}; {ran})"


@dataclass(frozen=True)
class UpcallCapabilities:
    """The probe's answers, one per kind of requester; `uid`/`gid` is the non-root one used."""

    uid: int
    gid: int
    root: UpcallOutcome
    non_root: UpcallOutcome  # a real non-root requester: ruid = euid = suid = fsuid = uid
    fsuid: UpcallOutcome  # euid 0 with fsuid/fsgid = uid (ruid 0)
    ruid_fsuid: UpcallOutcome  # ruid = fsuid = uid, euid and suid 0


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def become_user(uid: int, gid: int) -> None:
    """Drop every id to uid/gid and every supplementary group: a real unprivileged process."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def become_fsuid(uid: int, gid: int, *, real: bool = False) -> None:
    """Keep euid 0 but act as uid/gid for the keyring: the kernel's key code uses the fsuid.

    Kernel facts: %u/%g, a new key's owner, the key quota and every key permission check use
    cred->fsuid/fsgid; the user and user-session keyrings and a new session keyring's owner use
    the real uid (`real=True` sets it too: setresuid(uid, 0, 0)). Setting a non-zero fsuid drops
    the filesystem capabilities; the rest stay, CAP_SYS_ADMIN included. An execve() resets the
    fsuid to the euid: a program this process runs is root again.
    """
    libc = _libc()
    os.setgroups([])
    if real:
        os.setresgid(gid, 0, 0)
        os.setresuid(uid, 0, 0)
    # setfsuid/setfsgid return the previous id and report no error: check by asking again.
    libc.setfsgid(gid)
    libc.setfsuid(uid)
    if libc.setfsuid(-1) != uid or libc.setfsgid(-1) != gid:
        raise PermissionError(f"setfsuid({uid})/setfsgid({gid}) did not take effect")


def nobody() -> tuple[int, int]:
    """The uid and gid of `nobody`, the default non-root requester of the probe."""
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


def _request_in_child(become: Callable[[], None], description: bytes, out: int) -> None:
    """Run in the forked child: become the requester, request the key, report, never return."""
    code = 0
    try:
        try:
            become()
            # A new session keyring: the key lands there and dies with this child.
            keyutils.keyctl_join_session_keyring(None)
            serial = keyutils.request_key(b"user", description, b"probe", 0)
            payload = keyutils.keyctl_read(serial)
            keyutils.keyctl_invalidate(serial)
            answer = "ok" if payload == PROBE_PAYLOAD else "wrong payload"
        except KeyctlError as exc:
            answer = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        except BaseException as exc:  # report every failure; the parent must not hang
            answer = type(exc).__name__
        os.write(out, answer.encode())
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _run_case(become: Callable[[], None], description: bytes, timeout: float) -> str:
    """The child's answer ("ok", an errno name, or "timed out"); the child is always reaped."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _request_in_child(become, description, write_end)
    os.close(write_end)
    answer = "timed out"
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        if ready:
            answer = os.read(read_end, 256).decode(errors="replace") or "child failed"
    finally:
        os.close(read_end)
        if answer == "timed out":
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return answer


def _recorded(calls: Path) -> dict[str, int]:
    """case -> %u from the probe program's record lines (`DESCRIPTION UID`)."""
    try:
        lines = calls.read_text().splitlines()
    except FileNotFoundError:
        return {}
    found = {}
    for line in lines:
        desc, _, uid = line.rpartition(" ")
        found[desc.partition(":")[2]] = int(uid)
    return found


def probe(
    cases: Mapping[str, Callable[[], None]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    prefix: str | None = None,
) -> dict[str, UpcallOutcome]:
    """Request one key per case under a throwaway rule; each case's callable sets its identity.

    Needs root (the rule goes into /etc/request-key.d). `timeout` bounds each case.
    """
    if os.geteuid() != 0:
        raise PermissionError("the upcall probe writes a rule in /etc/request-key.d: run as root")
    keyctl = shutil.which("keyctl") or "/bin/keyctl"
    prefix = prefix or f"kmskeys-probe-{secrets.token_hex(4)}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    rule = REQUEST_KEY_D / f"{prefix}.conf"
    try:
        if any(ch.isspace() for ch in str(tmp) + keyctl):
            raise ValueError(f"{tmp} or {keyctl} contains whitespace, which a rule cannot hold")
        calls = tmp / "calls"
        script = tmp / "record"
        script.write_text(
            _SCRIPT.format(calls=calls, keyctl=keyctl, payload=PROBE_PAYLOAD.decode())
        )
        script.chmod(0o700)  # only request-key, as root, runs it
        rule.write_text(_RULE.format(prefix=prefix, script=script))
        # Everything a case's child runs after taking its identity is loaded now, as root: the
        # identity may not be able to read the installation (a checkout below a 0700 directory,
        # an interpreter under /root), and the binding and the error classes load lazily.
        keyutils.load_binding()
        import kmskeys.errors  # noqa: F401

        answers = {
            case: _run_case(become, f"{prefix}:{case}".encode(), timeout)
            for case, become in cases.items()
        }
        # The requester that started the upcall returns only after the program exits, so its
        # record is complete, except after a timeout: give a straggler a moment.
        if any(answer == "timed out" for answer in answers.values()):
            time.sleep(0.2)
        seen = _recorded(calls)
    finally:
        rule.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        case: UpcallOutcome(
            ran=case in seen, uid=seen.get(case), error=None if answer == "ok" else answer
        )
        for case, answer in answers.items()
    }


def probe_upcalls(
    timeout: float = DEFAULT_TIMEOUT,
    uid: int | None = None,
    gid: int | None = None,
    *,
    prefix: str | None = None,
    become_non_root: Callable[[int, int], None] = become_user,
) -> UpcallCapabilities:
    """Can root, a real non-root uid and the fsuid stand-ins trigger an upcall here? (root only)

    `become_non_root(uid, gid)` makes the non-root requester (default: `become_user`).
    """
    default_uid, default_gid = nobody()
    uid = default_uid if uid is None else uid
    gid = default_gid if gid is None else gid
    found = probe(
        {
            "root": lambda: None,
            "non-root": lambda: become_non_root(uid, gid),
            "fsuid": lambda: become_fsuid(uid, gid),
            "ruid-fsuid": lambda: become_fsuid(uid, gid, real=True),
        },
        timeout=timeout,
        prefix=prefix,
    )
    return UpcallCapabilities(
        uid=uid,
        gid=gid,
        root=found["root"],
        non_root=found["non-root"],
        fsuid=found["fsuid"],
        ruid_fsuid=found["ruid-fsuid"],
    )
