"""What the `sm:` and `ssm:` backends share: a fetched value, the host cache around the call.

A backend here reads a value where AWS users keep it (resolver/secretsmanager.py,
resolver/parameterstore.py) through one gateway operation each. The flow is the `kms:`
backend's (resolver/blobs.py), in the same order:

1. the operation's allowlist (`Gateway.authorize`): a name the config does not list is refused
   before the host cache is consulted and before any client exists;
2. the host cache (resolver/cachedfetch.py `Through`, as for `kms:` blobs and `token:`): one
   entry per identical AWS request (service, Region, secret or parameter, version selector),
   whatever is then taken from it, so every uid and keyring asking, and every field of one JSON
   secret, share one call per host per ttl; charged to the requester's uid, refreshed ahead by
   `kmskeys-resolver refresh` like any key. The entry records the version the service returned
   (VersionId, parameter version), logged with each answer;
3. the call, spending the requester's budget; its answer refreshes the entry. A stale entry
   (up to `stale_grace` old) answers only while the service is unavailable (EAGAIN class,
   never a refusal), after at most `stale_wait`; a refusal or an unknown answer drops the
   entry.

The value is then cut to what the description asks for (a JSON field, for `sm:`) and bounded:
a kernel key holds 1 to 32767 bytes, and a value outside that is refused saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from kmskeys.contract import USER_PAYLOAD_MAX, hostcache_entry
from resolver.backend import Context, Request, Result
from resolver.errors import ConfigError, RefusedError, ServiceUnavailableError
from resolver.gateway import Authorized, Gateway, Operation, Target
from resolver.sourcename import Arn

if TYPE_CHECKING:
    from resolver.config import Config
    from resolver.hostcache import Cache

RECORD_VERSION = b"1"
TEXT, BINARY = b"t", b"b"


class Fetched:
    """One version of a value as the service returned it: the bytes, the version it named
    (a VersionId, a parameter version) and whether it is binary (SecretBinary)."""

    __slots__ = ("binary", "value", "version")

    def __init__(self, value: bytes, version: str, binary: bool = False) -> None:
        self.value = value
        self.version = version
        self.binary = binary

    def pack(self) -> bytes:
        """The host-cache record: `1 KIND VERSION` and a newline, then the value."""
        kind = BINARY if self.binary else TEXT
        return b" ".join((RECORD_VERSION, kind, self.version.encode("ascii"))) + b"\n" + self.value

    @classmethod
    def unpack(cls, record: bytes) -> Fetched | None:
        """The record's Fetched, or None when it is not one (another format, damaged)."""
        head, newline, value = record.partition(b"\n")
        parts = head.split(b" ")
        if not newline or len(parts) != 3 or parts[0] != RECORD_VERSION:
            return None
        if parts[1] not in (TEXT, BINARY) or not parts[2].isascii():
            return None
        return cls(value, parts[2].decode("ascii"), binary=parts[1] == BINARY)

    def __repr__(self) -> str:  # never the value
        return f"Fetched({len(self.value)} bytes, version={self.version!r})"


def version_text(value: object, most: int = 64) -> str | None:
    """A version as a service names it, if it is printable ASCII without blanks, else None."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not 0 < len(text) <= most:
        return None
    return text if text.isascii() and text.isprintable() and " " not in text else None


def allowed_target(
    found: Arn | str | None, resource: str, regions: Sequence[str], *, refused: str, unset: str
) -> Target:
    """Where an allowlisted secret or parameter is read: by the full ARN the allowlist lists (its
    Region), or by `resource` in the first configured Region. `found` is what the allowlist
    matched (resolver/sourcename.py `allowed`): None refuses with `refused`, and a name with no
    Region configured is the config's error `unset`."""
    if found is None:
        raise RefusedError(refused)
    if isinstance(found, Arn):
        return Target(found.text, found.region)
    if not regions:
        raise ConfigError(unset)
    return Target(resource, regions[0])


def check_answered(
    op: Operation[Fetched], target: Target, arn: str, name: str, *, named: bool, what: str
) -> None:
    """The answer is about the very `what` asked for: `named` (its Name matched `name`), its ARN
    names `name` in this service and the target's Region, and is the ARN asked for, if one was."""
    try:
        parsed = Arn(arn)
    except ValueError:
        raise ServiceUnavailableError(f"{op.label} answered a malformed ARN") from None
    asked_arn = target.resource if target.resource.startswith("arn:") else None
    if (
        not named
        or parsed.name != name
        or parsed.service != op.service
        or parsed.region != target.region
        or (asked_arn is not None and arn != asked_arn)
    ):
        raise RefusedError(f"{op.label} answered with another {what} than asked for")


class SourceOperation(Operation[Fetched], Protocol):
    """A gateway operation that fetches one version of a secret or parameter."""

    def identity(self, target: Target) -> str:
        """What makes two requests identical to the service: the host cache's key."""
        ...


class SourceBackend:
    """The flow above for one service; a subclass says how a request becomes an operation
    (`operation`) and what of the fetched value it asks for (`select`)."""

    source = "aws"  # the log's `source=` for an answer from the service

    def __init__(
        self, config: Config, gateway: Gateway | None = None, cache: Cache | None = None
    ) -> None:
        self.config = config
        self.gateway = gateway if gateway is not None else Gateway(config)
        self._cache = cache

    def operation(self, request: Request, notes: dict[str, str]) -> SourceOperation:
        """The request's operation (its selector parsed: RefusedError), facts in `notes`."""
        raise NotImplementedError

    def select(self, fetched: Fetched, request: Request) -> bytes:
        """The part of the fetched value the request asks for."""
        return fetched.value

    def resolve(self, request: Request, context: Context) -> Result:
        """The value for this request: the allowlist, then the host cache, then the call."""
        op = self.operation(request, context.notes)
        authorized = self.gateway.authorize(op)  # the allowlist: no AWS call, no cache
        if not self.config.host_cache:
            fetched = self._call(authorized, context)
            context.notes["source"] = self.source
            return self._result(fetched, request, context)
        from resolver.cachedfetch import Through
        from resolver.hostcache import blob_digest

        digest = blob_digest(op.identity(authorized.target).encode())
        desc = hostcache_entry(request.prefix, request.name, None, digest)

        def refresh(own: Context) -> bytes:
            # Kept whole (every field of a secret shares it), with the version it had.
            return self._call(authorized, own).pack()

        # Fresh, one call per host, stale while the service is unavailable (at most
        # stale_wait of waiting for a hung one); a refusal or an unknown answer purges the
        # entry (resolver/cachedfetch.py).
        cached = Through(self.config, self.cache(), desc, refresh, request=request, label=op.label)
        kept = cached.fetch(context)
        record = Fetched.unpack(kept.payload)
        if record is None:
            raise ServiceUnavailableError("the host-cache entry is not a value record")
        context.notes.setdefault("source", self.source)
        return self._result(record, request, context, ttl=kept.ttl, stale=kept.stale)

    def cache(self) -> Cache:
        """The host cache (root's keyring), made on first use."""
        if self._cache is None:
            from resolver.hostcache import HostCache

            self._cache = HostCache(self.config)
        return self._cache

    def _call(self, authorized: Authorized[Fetched], context: Context) -> Fetched:
        return self.gateway.call(authorized, context.budget, context.deadline, context.timings)

    def _result(self, fetched: Fetched, request: Request, context: Context, **kept: Any) -> Result:
        context.notes["version"] = fetched.version
        payload = self.select(fetched, request)
        size = len(payload)
        if size > USER_PAYLOAD_MAX:
            raise RefusedError(
                f"the value is {size} bytes: a kernel key holds at most {USER_PAYLOAD_MAX} "
                "(ask for one #FIELD of a JSON secret, or keep it smaller)"
            )
        if not size:
            raise RefusedError("the value is empty: a kernel key cannot hold 0 bytes")
        return Result(payload, details=context.notes, **kept)
