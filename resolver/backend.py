"""The one interface a backend resolves through: a request, as the kernel told it, to a Result.

A leaf module: it imports nothing of the resolver, so every backend (`kms:` blobs, the `stored:`
keystore, and Secrets Manager, Parameter Store or a token next), the pipeline and the resolver
daemon can import it without a cycle. The backends the resolver ships are listed in
resolver/registry.py; each declares itself (settings, grammar, policy table) in a BackendSpec.

A backend returns a Result or raises a ResolverError subclass (unknown, refused, unavailable)
and nothing else the pipeline must understand; it never instantiates or rejects a key, never
writes a log line, and decides nothing about the key but its payload, its ttl and staleness.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kmskeys.flushepoch import Mark


@dataclass(frozen=True)
class Request:
    """Who asks for what, as the kernel told us (never as the blob or the callout says).

    `callout` is the requester's callout info, read from the request's authorization key: for
    `kms:` an inline blob (or empty: load NAME.kms from blob_dir), for `stored:` a key size.
    `qualifier` is what follows NAME in a `stored:` description (`#user#v2`, kmskeys.stored);
    always empty for `kms:`. `pid` is the requesting process when known (None today).
    `unit` is the requester's systemd unit when the backend asked the binding for it (a
    unit-bound blob), from the root-controlled part of its cgroup: never from the request.
    """

    prefix: str
    name: str
    uid: int
    gid: int
    user: str | None
    callout: bytes = b""
    qualifier: str = ""
    pid: int | None = None
    unit: str | None = None

    def __repr__(self) -> str:  # never the callout: it may be a blob
        return f"Request({self.prefix}:{self.name}{self.qualifier}, uid={self.uid})"


@dataclass
class Timings:
    """Milliseconds spent per phase of a request, for the log line and the benchmark."""

    phases: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, ms: float) -> None:
        """Record (or accumulate) `ms` for `phase`."""
        self.phases[phase] = self.phases.get(phase, 0.0) + ms

    def __str__(self) -> str:
        # Tenths: sub-millisecond phases (the host cache, the identification) stay visible.
        return ",".join(f"{k}:{v:.1f}" for k, v in self.phases.items())


class Result:
    """What a backend answers: the payload, and the facts the pipeline decides the key with.

    `ttl` None means the name's ttl from policy; a stale answer (served past freshness because
    the service is unavailable) brings its own short ttl. `details` are plain facts for the log
    line (source, mode, age, reason), never a payload or a blob.
    """

    # A plain class, not a dataclass: the handler imports this for every miss, and each
    # dataclass costs a few hundred microseconds to create.
    __slots__ = ("details", "payload", "stale", "ttl")

    def __init__(
        self,
        payload: bytes,
        ttl: int | None = None,
        stale: bool = False,
        details: Mapping[str, str] | None = None,
    ) -> None:
        self.payload = payload
        self.ttl = ttl
        self.stale = stale
        self.details: Mapping[str, str] = details if details is not None else {}

    def __repr__(self) -> str:  # never the payload
        return f"Result({len(self.payload)} bytes, ttl={self.ttl}, stale={self.stale})"


class Budget(Protocol):
    """Whose calls to AWS these are: each call (retries included) spends one token."""

    def spend(self) -> None:
        """Take a token, or raise UnavailableError (EAGAIN) when there is none."""
        ...


class Context:
    """What a backend resolves within: the deadline (time.monotonic()), the budget its AWS
    calls spend, the timings it adds to, and `notes`: the log line's facts so far, which a
    failure is logged with too (the source of a blob that then failed to decrypt, say).
    `binding` is the request's program binding (resolver/binding.py), which a backend asks for
    the requester's unit (a unit-bound blob); None where no request is identified (prefetch).
    `flush`: the request's flush epoch (kmskeys/flushepoch.py), None outside a request.
    `via`: who resolves it when not a miss (`refresh`: the refresher), for a line logged later."""

    __slots__ = ("binding", "budget", "deadline", "flush", "notes", "timings", "via")

    def __init__(self, deadline: float, budget: Budget, via: str | None = None) -> None:
        self.deadline = deadline
        self.budget = budget
        self.via = via
        self.timings = Timings()
        self.notes: dict[str, str] = {}
        self.binding: ProgramBinding | None = None
        # The request's flush epoch when it started (kmskeys/flushepoch.py): the host cache
        # keeps and trusts entries under it; None outside a request (prefetch, refresh).
        self.flush: Mark | None = None


class ProgramBinding(Protocol):
    """A request's program binding (resolver/binding.Binding): who asked, decided on demand."""

    def unit(self, context: Context) -> str:
        """The requester's systemd unit, read from its cgroup (RefusedError if it has none)."""
        ...

    def perm(self, admin_group: bool) -> int | None:
        """The key's mask if the request is bound to its requester, else None."""
        ...

    def still_waiting(self) -> None:
        """RequesterGoneError unless the requester still waits, unkilled."""
        ...


class Backend(Protocol):
    """Resolves one request within `context.deadline`."""

    def resolve(self, request: Request, context: Context) -> Result:
        """Return the Result, or raise UnknownSecretError, RefusedError or UnavailableError."""
        ...


class BackendSpec:
    """A backend's declaration (jaraco/keyring style, minus entry-point discovery: a root
    program loads only the backends it ships, resolver/registry.py).

    `settings` is its settings table (a dataclass of resolver.settings fields, composed into
    Config); `prefix_setting` names the setting that holds its description prefix, and
    `policy_setting` its `[TABLE."GLOB"]` per-name policy; `split` is its grammar: NAME and
    qualifier from what follows `PREFIX:` (InvalidNameError if it does not parse).
    """

    __slots__ = ("name", "policy_setting", "prefix_setting", "settings", "split")

    def __init__(
        self,
        name: str,
        settings: type,
        prefix_setting: str,
        policy_setting: str,
        split: Callable[[str], tuple[str, str]],
    ) -> None:
        self.name = name
        self.settings = settings
        self.prefix_setting = prefix_setting
        self.policy_setting = policy_setting
        self.split = split
