"""Resolution, apart from answering: a request as the kernel told it, and the config, to an Outcome.

`resolve` runs everything between the kernel's request and its answer: the description's
grammar, the requester's user name, policy, the backend (whose AWS calls spend the requester's
budget), the payload's bounds, and the key's ttl, owner and mask. It touches no key: the
handler carries the Outcome out (resolver/answer.py) on the key it holds authority over; a
daemon can run the same function in process and hand the Outcome to a small C program that
answers the key (issue 23).

Every failure becomes a rejection Outcome, classified by resolver.errors.failure, the caller's
watchdog (DeadlineExceeded) included: a missed deadline is EAGAIN.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from kmskeys import flushepoch
from kmskeys.contract import (
    ADMIN_GROUP,
    ADMIN_KEY_PERM,
    ADMIN_NEGATIVE_KEY_PERM,
    NEGATIVE_KEY_PERM,
    RESOLVED_KEY_PERM,
    USER_PAYLOAD_MAX,
)
from kmskeys.errors import InvalidNameError
from resolver.backend import Budget, Context, Request, Result
from resolver.binding import Binding, ViewSource
from resolver.config import Config
from resolver.errors import DeadlineExceeded, RefusedError, ResolverError, failure
from resolver.limits import UidBudget
from resolver.log import LOG_INFO, LOG_WARNING
from resolver.outcome import Outcome
from resolver.policy import check_allowed, user_name
from resolver.registry import backend_for, split_description

if TYPE_CHECKING:
    from resolver.requester import AuthView


class KernelRequest:
    """A request as the kernel told it: the key under construction (%k), its description
    (%d), the requester's fsuid and fsgid (%u, %g), the callout (from the authorization key)
    and, when known, the requester's pid (informational: the identification never uses it).

    For a program-bound name (resolver/binding.py): `keyrings`, the requester's thread, process
    and session keyrings (%T %P %S, 0 for none), and `view`, what the holder of the request's
    authority sees of it (resolver.requester.AuthView), or a callable that gets it when needed;
    None means this process holds the authority and gathers it itself (the handler). Under the
    daemon path the gate supplies both (docs/resolver.md, "Identifying the requester").
    """

    __slots__ = ("callout", "description", "gid", "key", "keyrings", "pid", "uid", "view")

    def __init__(
        self,
        key: int,
        description: str,
        uid: int,
        gid: int,
        *,
        callout: bytes = b"",
        pid: int | None = None,
        keyrings: tuple[int, int, int] = (0, 0, 0),
        view: AuthView | ViewSource | None = None,
    ) -> None:
        self.key = key
        self.description = description
        self.uid = uid
        self.gid = gid
        self.callout = callout
        self.pid = pid
        self.keyrings = keyrings
        self.view = view

    def __repr__(self) -> str:  # never the callout: it may be a blob
        return f"KernelRequest(key={self.key}, {self.description!r}, uid={self.uid})"


def resolve(
    asked: KernelRequest,
    config: Config,
    deadline: float,
    *,
    budget: Budget | None = None,
    fired: Callable[[], bool] = lambda: False,
    via: str | None = None,
) -> Outcome:
    """The Outcome of `asked` under `config` within `deadline` (time.monotonic()).

    `budget` pays for its AWS calls (by default the requester's uid bucket); `fired` says
    whether the caller's watchdog has fired, which makes any failure EAGAIN (`failure`); `via`
    names who resolves it when not a miss (the refresher), in lines logged after it returns.
    """
    spent = budget if budget is not None else UidBudget(config, asked.uid)
    context = Context(deadline, spent, via)
    facts: dict[str, str | None] = {"name": asked.description, "user": None}
    try:
        result = _resolve(asked, config, context, facts)
        return answered(asked, config, result, context, facts)
    except (Exception, DeadlineExceeded) as exc:  # every failure is answered
        error = failure(exc, fired())
    return rejection(asked, error, config.negative_ttl, context, facts)


def _resolve(
    asked: KernelRequest, config: Config, context: Context, facts: dict[str, str | None]
) -> Result:
    try:
        prefix, name, qualifier = split_description(config, asked.description)
    except InvalidNameError as exc:
        raise RefusedError(str(exc)) from None
    facts["name"] = name
    # Before anything is read: a flush from now on makes this request resolve again.
    context.flush = flushepoch.mark(config.state_dir, prefix, name)
    facts["user"] = user = user_name(asked.uid)
    check_allowed(config, name, asked.uid, user, prefix)
    # Programs, after users and before any backend: nothing is read for a name without a policy.
    binding = Binding(
        asked.key, asked.uid, asked.keyrings, asked.view, config.rule_for(name, prefix)
    )
    binding.admit(context)
    context.binding = binding
    request = Request(prefix, name, asked.uid, asked.gid, user, asked.callout, qualifier, asked.pid)
    result = backend_for(config, prefix).resolve(request, context)
    size = len(result.payload)
    if not 0 < size <= USER_PAYLOAD_MAX:
        raise RefusedError(f"plaintext size {size} is outside 1..{USER_PAYLOAD_MAX}")
    ttl = result.ttl or config.ttl_for(name, prefix)
    return Result(result.payload, spread(ttl, config.ttl_jitter), result.stale, result.details)


def answered(
    asked: KernelRequest,
    config: Config,
    result: Result,
    context: Context,
    facts: dict[str, str | None],
) -> Outcome:
    """The answer Outcome: the payload, with the key's owner, mask and timeout."""
    assert result.ttl is not None
    # The admin group lets root's `kmskeys flush` find and invalidate the key (VIEW, SEARCH),
    # never read or link it; a host without the group keeps %g and no group bits.
    gid = admin_group()
    perm = RESOLVED_KEY_PERM if gid is None else ADMIN_KEY_PERM
    if context.binding is not None:
        # A program-bound key: possessor bits only, and only for a requester still waiting.
        context.binding.still_waiting()
        perm = context.binding.perm(gid is not None) or perm
    details = {**context.notes, **result.details}
    return Outcome(
        "stale" if result.stale else "ok",
        LOG_WARNING if result.stale else LOG_INFO,
        key=asked.key,
        uid=asked.uid,
        timeout=result.ttl,
        negative_ttl=config.negative_ttl,
        payload=result.payload,
        gid=asked.gid if gid is None else gid,
        perm=perm,
        name=facts["name"] or asked.description,
        user=facts["user"],
        details=tuple(details.items()),
        # Served from an older host-cache entry because the service is unavailable: say why.
        reason=details.get("reason") if result.stale else None,
        timings=str(context.timings),
        flush=context.flush,
    )


def rejection(
    asked: KernelRequest,
    error: ResolverError,
    negative_ttl: int,
    context: Context | None = None,
    facts: dict[str, str | None] | None = None,
) -> Outcome:
    """The rejection Outcome of `asked` with `error`, cached (but EAGAIN) for negative_ttl."""
    facts = facts or {}
    # The refusal's mask (resolver/answer.py negative_mask): no possessor bits; the admin
    # group may make it expire (root's `kmskeys flush`).
    gid = admin_group()
    pending = Outcome(
        "error",
        LOG_WARNING,
        key=asked.key,
        uid=asked.uid,
        timeout=negative_ttl,
        negative_ttl=negative_ttl,
        gid=asked.gid if gid is None else gid,
        perm=NEGATIVE_KEY_PERM if gid is None else ADMIN_NEGATIVE_KEY_PERM,
        name=facts.get("name") or asked.description,
        user=facts.get("user"),
        details=tuple(context.notes.items()) if context is not None else (),
        timings=str(context.timings) if context is not None else "",
        flush=context.flush if context is not None else None,
    )
    return pending.rejected(error)


def spread(ttl: int, jitter: float) -> int:
    """`ttl` times a random factor in [1 - jitter, 1 + jitter], in whole seconds, at least 1.

    The kernel keeps key expiry in whole seconds (and a timeout of T lasts T-1 to T s), so the
    spread only shows once ttl * jitter reaches half a second: ttl 4 or less never moves at 10 %.
    """
    if not jitter:
        return ttl
    factor = 1.0 + jitter * (int.from_bytes(os.urandom(4)) / 0xFFFFFFFF * 2.0 - 1.0)
    return max(1, round(ttl * factor))


def admin_group() -> int | None:
    """The gid of the admin group if it exists and has no members, else None.

    A member would get group SEARCH on every key, and with it possession of a key in any keyring
    it holds, and possession reads: a group that gained members is never used.
    """
    import grp

    try:
        group = grp.getgrnam(ADMIN_GROUP)
    except KeyError:
        return None
    return None if group.gr_mem else group.gr_gid
