"""The gate's side of a miss in the resolver daemon: its REQUEST read as the pipeline's request
(when it started, who asked, what the authority saw), the key as its REPORT says each call went
(ReplayKey, so that resolver/answer.py logs what the handler would), and the Outcome as the
OUTCOME message the gate carries out (with the flush tokens it re-reads before it answers).
resolver/daemon_request.py runs the miss itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kmskeys.errors import InvalidNameError, KeyctlError, KmsKeysError, error_for_errno
from resolver import config as config_mod
from resolver import wire
from resolver.errors import (
    IdentityUnclearError,
    RefusedError,
    ServiceUnavailableError,
    errno_name,
)
from resolver.handler import process_started
from resolver.outcome import Outcome
from resolver.pipeline import KernelRequest
from resolver.registry import split_description
from resolver.requester import AuthView

if TYPE_CHECKING:
    from kmskeys.flushepoch import Tokens

_STEPS = {
    wire.STEP_CHOWN: "keyctl_chown",
    wire.STEP_SETPERM: "keyctl_setperm",
    wire.STEP_TIMEOUT: "keyctl_set_timeout",
    wire.STEP_INSTANTIATE: "keyctl_instantiate",
}


class ReplayKey:
    """The key as the gate found it: each call fails as the gate's REPORT says its own did, so
    that resolver/answer.py decides and logs exactly what the handler would have."""

    def __init__(self, report: wire.Report) -> None:
        self.report = report

    def _step(self, step: int) -> None:
        if self.report.step == step:
            raise error_for_errno(self.report.failed_errno, _STEPS[step])

    def assume_authority(self) -> None:
        """The gate holds it."""

    def chown(self, uid: int, gid: int = -1) -> None:
        """As the gate's chown went."""
        self._step(wire.STEP_CHOWN)

    def setperm(self, perm: int) -> None:
        """As the gate's setperm went."""
        self._step(wire.STEP_SETPERM)

    def set_timeout(self, seconds: int) -> None:
        """As the gate's set_timeout went."""
        self._step(wire.STEP_TIMEOUT)

    def instantiate(self, payload: str | bytes, keyring: int = 0) -> None:
        """As the gate's instantiate went."""
        self._step(wire.STEP_INSTANTIATE)

    def reject(self, timeout: int, error: int, keyring: int = 0) -> None:
        """As the gate's reject went; a reject with another errno than the one decided here is
        a gate of other rules, said in the line."""
        done = self.report.reject_errno
        if done != error:
            raise KeyctlError(f"the gate rejected with {errno_name(done)}, not {errno_name(error)}")
        if self.report.reject_result:
            raise error_for_errno(self.report.reject_result, "keyctl_reject")


def started_at(request: wire.GateRequest, pid: int) -> float:
    """When the gate started, on the time.monotonic() clock: as it says (CLOCK_MONOTONIC is one
    clock for every process), within its process's start from /proc (to 10 ms) and now."""
    now = time.monotonic()
    said = request.started_us / 1e6
    earliest = process_started(pid) - 0.02
    return said if earliest <= said <= now else min(now, max(earliest, now - 60.0))


def identity(request: wire.GateRequest, ask: Callable[[], wire.GateView]) -> dict[str, Any]:
    """What KernelRequest takes of the requester's identity (docs/resolver.md, "Identifying the
    requester"): the requester's keyrings (%T %P %S), and as its view a callable that asks the
    gate for what it sees holding the authority (`ask`: VIEW_ASK, then the gate's VIEW), which
    the pipeline calls only for a request it must identify, and judges as it judges the
    handler's own. No pid: as in the handler, the identification alone names the requester."""

    def view() -> AuthView:
        seen = ask()
        if seen.flags & wire.FLAG_PROC_KEYS_CUT:
            # The gate stopped reading /proc/keys before its end: the kernel's line may be
            # among those missing, and a forged one pass for it. Unclear, so EAGAIN: never cached.
            raise IdentityUnclearError(
                f"/proc/keys is longer than kmskeys-gate reads ({wire.PROC_KEYS_SCAN_MAX} bytes): "
                "the authorization key's lines may be missing"
            )
        return AuthView(request.auth, seen.lines, seen.dest, seen.dest_description)

    return {"keyrings": request.keyrings, "view": view}


def facts_of(asked: KernelRequest, config: config_mod.Config) -> dict[str, str | None]:
    """The log line's name for a request answered before the pipeline ran."""
    try:
        return {"name": split_description(config, asked.description)[1]}
    except InvalidNameError:
        return {"name": asked.description}


def unflushed(outcome: Outcome) -> tuple[Outcome, Tokens]:
    """The outcome to send, EAGAIN (never cached) if root flushed its name since it started, and
    the flush tokens it was resolved under, as the gate is to find them still (from this read
    on, a flush is the gate's to see: resolver/gate_daemon.c)."""
    tokens: Tokens | None = ()
    if outcome.flush is not None:
        try:
            tokens = outcome.flush.tokens()
        except (OSError, KmsKeysError):  # an unsafe token directory: as flushed (answer.py)
            tokens = None
    if tokens is None:
        outcome, tokens = outcome.rejected(_FLUSHED), ()
    return outcome.replace(flush=None), tokens


def flushed_meanwhile(outcome: Outcome) -> Outcome:
    """What the gate answered when it found a flush token changed: EAGAIN."""
    return outcome.rejected(_FLUSHED)


_FLUSHED = ServiceUnavailableError("flushed by root while resolving; ask again")


def outcome_message_of(outcome: Outcome, tokens: Tokens) -> bytes:
    if outcome.answered:
        if outcome.perm & ~wire.ANSWER_PERM_ALLOWED:
            error = RefusedError(f"the answer's mask {outcome.perm:08x} is not one the gate allows")
            outcome = outcome.rejected(error)
        else:
            return wire.outcome_message(
                0,
                uid=outcome.uid,
                gid=outcome.gid,
                perm=outcome.perm,
                negative_perm=outcome.negative_perm,
                timeout=outcome.timeout,
                negative_ttl=outcome.negative_ttl,
                payload=outcome.payload,
                tokens=tokens,
            )
    return wire.outcome_message(
        outcome.errno,
        uid=outcome.uid,
        gid=outcome.gid,
        perm=0,
        # The refusal's owner and mask, set before the reject as the handler's negative_mask
        # does (no possessor bits; the admin group's SETATTR for root's flush).
        negative_perm=outcome.negative_perm,
        timeout=outcome.timeout,
        negative_ttl=outcome.negative_ttl,
        tokens=tokens,
    )
