"""The one answer path: carry out an Outcome on the key, and write the request's one log line.

The handler and the supervisor's backstop answer through here, and the log writer is built from
the config here alone. In the resolver daemon, the gate answers the key (resolver/gate_daemon.c,
the same steps from the same facts, kmskeys/contract.h) and the daemon runs this on what the
gate reported (resolver/daemon_gate.py ReplayKey), so the line is the same. The gate also
writes the line of a busy uid's key itself, from the same field rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kmskeys.errors import KmsKeysError, QuotaExceededError
from resolver.errors import QuotaError, RefusedError, ServiceUnavailableError
from resolver.log import LOG_ERR, SyslogWriter, format_fields
from resolver.outcome import Outcome
from resolver.settings import DEFAULT_SYSLOG_SOCKET, FACILITIES

if TYPE_CHECKING:
    from resolver.config import Config


class KeyHandle(Protocol):
    """The calls that answer a key under construction (kmskeys.key.Key; in tests, the
    in-memory kernel of tests/backends)."""

    def assume_authority(self) -> None:
        """Take the authority request-key was given over the key."""
        ...

    def chown(self, uid: int, gid: int = -1) -> None:
        """Set the key's owner and group."""
        ...

    def setperm(self, perm: int) -> None:
        """Set the key's permission mask."""
        ...

    def set_timeout(self, seconds: int) -> None:
        """Expire the key `seconds` from now."""
        ...

    def instantiate(self, payload: str | bytes, keyring: int = 0) -> None:
        """Give the key its payload: every waiter wakes with it."""
        ...

    def reject(self, timeout: int, error: int, keyring: int = 0) -> None:
        """Negate the key with `error` for `timeout` seconds."""
        ...


def log_writer(config: Config | None = None, found: tuple[Path, str] | None = None) -> SyslogWriter:
    """The syslog writer of `config`, or of the (socket, facility) a config that failed to
    load still names (config.log_settings), or the defaults: the one place it is built."""
    if config is not None:
        return SyslogWriter(config.syslog_socket, FACILITIES[config.syslog_facility])
    if found is not None:
        return SyslogWriter(found[0], FACILITIES[found[1]])
    return SyslogWriter(DEFAULT_SYSLOG_SOCKET, FACILITIES["authpriv"])


def answer(
    key: KeyHandle,
    outcome: Outcome,
    log: SyslogWriter,
    started: float,
    again: Callable[[], Outcome] | None = None,
) -> int:
    """Instantiate or reject the key as `outcome` says (the authority is assumed), and log
    it once; 0 when the key was answered, 1 when the kernel refused both.

    When root flushed the request's name since it started (`outcome.flush`), the outcome may
    hold what the flush was meant to remove: `again()` resolves the request anew and that is
    answered instead (once, before the key is touched); flushed after that, the key is
    rejected EAGAIN, which the kernel never caches, and the requester asks again."""
    if again is not None and flushed(outcome):
        outcome = again()
    if outcome.answered:
        try:
            # Ownership, permissions and expiry are set before instantiation, so no waiter
            # ever sees the key with the kernel's defaults.
            key.chown(outcome.uid, outcome.gid)
            key.setperm(outcome.perm)
            key.set_timeout(outcome.timeout)
            # After the owner, admin group and mask (a flush from now on finds the key and
            # invalidates it), before the payload (a flush before now is seen here).
            if not flushed(outcome):
                key.instantiate(outcome.payload, 0)
                log.emit(outcome.severity, outcome.line(_ms(started)))
                return 0
        except QuotaExceededError as exc:
            outcome = outcome.rejected(QuotaError(f"requester's key quota is full: {exc.strerror}"))
        except KmsKeysError as exc:
            outcome = outcome.rejected(RefusedError(f"instantiate failed: {exc}"))
    return _reject(key, outcome, log, started)


def flushed(outcome: Outcome) -> bool:
    """True if root flushed the request's name since it started (kmskeys/flushepoch.py); a
    token that cannot be read counts as flushed (EAGAIN: the requester asks again)."""
    if outcome.flush is None:
        return False
    try:
        return outcome.flush.changed()
    except (OSError, KmsKeysError):  # an unsafe token directory (fileio's refusal) too
        return True


def answer_unanswered(key: KeyHandle, outcome: Outcome, log: SyslogWriter, started: float) -> int:
    """The supervisor's backstop: reject the key as `outcome` says unless it has been answered
    already (by the worker that then died or hung), logged at ERR. 0 if nothing was left."""
    try:
        # Instantiating or rejecting revokes the authorisation key: if the worker answered,
        # authority can no longer be assumed, and there is nothing left to do.
        key.assume_authority()
    except KmsKeysError:
        return 0
    negative_mask(key, outcome)
    try:
        key.reject(outcome.timeout, outcome.errno, 0)
    except KmsKeysError:
        return 1  # answered meanwhile after all
    log.emit(LOG_ERR, outcome.line(_ms(started)))
    return 1


def log_error(
    log: SyslogWriter,
    reason: str,
    *,
    uid: int | None = None,
    name: str | None = None,
    key: int | None = None,
    started: float | None = None,
) -> None:
    """The line of a request that cannot be answered at all (no authority, a bad argv)."""
    ms = None if started is None else f"{_ms(started):.0f}"
    line = format_fields(uid=uid, name=name, key=key, outcome="error", reason=reason, ms=ms)
    log.emit(LOG_ERR, line)


def negative_mask(key: KeyHandle, outcome: Outcome) -> None:
    """Before a rejection: the owner, group and mask of a cached refusal (`outcome.perm`,
    contract.NEGATIVE_KEY_PERM or ADMIN_NEGATIVE_KEY_PERM).

    No possessor bits, or a co-possessor's add_key of the same description would instantiate
    the refused key with its own payload; the admin group may make it expire (root's flush).
    The kernel's own negation keeps its default mask: that is how the client tells a failed
    upcall from this answer (kmskeys/cached.py). The answer matters more than its mask: a
    failure here leaves the kernel's default.
    """
    if not outcome.perm:
        return
    try:
        key.chown(outcome.uid, outcome.gid)
        key.setperm(outcome.perm)
    except KmsKeysError:
        pass


def _reject(key: KeyHandle, outcome: Outcome, log: SyslogWriter, started: float) -> int:
    negative_mask(key, outcome)
    if flushed(outcome):
        # Decided before root's flush (a value, or a refusal of a blob deployed since): the
        # flush found no key to remove, so nothing of it is cached (EAGAIN never is).
        why = ServiceUnavailableError("flushed by root while resolving; ask again")
        outcome = outcome.rejected(why).replace(flush=None)
    try:
        key.reject(outcome.timeout, outcome.errno, 0)
    except KmsKeysError as exc:
        failed = outcome.replace(severity=LOG_ERR, reason=f"{outcome.reason}; reject failed: {exc}")
        log.emit(failed.severity, failed.line(_ms(started)))
        return 1
    log.emit(outcome.severity, outcome.line(_ms(started)))
    return 0


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
