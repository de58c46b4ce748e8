"""The one interface the handler resolves through: a request, as the kernel told it, to plaintext.

A leaf module: it imports nothing of the resolver, so every backend (`kms:` blobs, the `stored:`
keystore) and the handler can import it without a cycle. The registry that picks a backend for a
request is resolver/registry.py.

A backend raises a ResolverError subclass (unknown, refused, unavailable) and nothing else the
handler must understand; it never instantiates or rejects the key itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kmskeys.blob import Blob


@dataclass(frozen=True)
class Request:
    """Who asks for what, as the kernel told us (never as the blob or the callout says).

    `callout` is the requester's callout info, read from the request's authorization key: for
    `kms:` an inline blob (or empty: load NAME.kms from blob_dir), for `stored:` a key size.
    `qualifier` is what follows NAME in a `stored:` description (`#user#v2`, kmskeys.stored);
    always empty for `kms:`.
    """

    prefix: str
    name: str
    uid: int
    gid: int
    user: str | None
    callout: bytes = b""
    qualifier: str = ""


@dataclass
class Timings:
    """Milliseconds spent per phase of a request, for the log line and the benchmark."""

    phases: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, ms: float) -> None:
        """Record (or accumulate) `ms` for `phase`."""
        self.phases[phase] = self.phases.get(phase, 0.0) + ms

    def __str__(self) -> str:
        return ",".join(f"{k}:{v:.0f}" for k, v in self.phases.items())


@dataclass
class Trace:
    """What a backend tells the handler's log line: timings and a few plain facts."""

    timings: Timings = field(default_factory=Timings)
    # e.g. source=inline|blob_dir|hostcache, mode=direct|envelope, age=SECONDS (of a host-cache
    # entry); never a payload or a blob.
    details: dict[str, str] = field(default_factory=dict)
    # A stale answer (KMS unavailable, an older host-cache entry served): the handler logs
    # outcome=stale and gives the key this timeout instead of the name's ttl.
    stale_ttl: int | None = None


class SecretBackend(Protocol):
    """Resolves one request within a monotonic deadline."""

    def resolve(self, request: Request, deadline: float, trace: Trace) -> bytes:
        """Return the plaintext, or raise UnknownSecretError, RefusedError or UnavailableError."""
        ...


class BlobDecrypter(Protocol):
    """Turns a parsed `kms:` blob into plaintext for one request: in process, or via the daemon."""

    def decrypt(self, blob: Blob, request: Request, deadline: float, timings: Timings) -> bytes:
        """Return the plaintext, or raise a classified ResolverError."""
        ...
