"""The one interface the handler decrypts through: blob + request context -> plaintext.

A backend raises a ResolverError subclass (unknown, refused, unavailable) and nothing else that
the handler must understand. `kms` is the first backend; others plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from kmskeys.blob import Blob
from resolver.config import Config
from resolver.errors import ConfigError


@dataclass(frozen=True)
class Request:
    """Who asks for what, as the kernel told us (never as the blob or the callout says)."""

    name: str
    uid: int
    gid: int
    user: str | None


@dataclass
class Timings:
    """Milliseconds spent per phase of a request, for the log line and the benchmark."""

    phases: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, ms: float) -> None:
        """Record (or accumulate) `ms` for `phase`."""
        self.phases[phase] = self.phases.get(phase, 0.0) + ms

    def __str__(self) -> str:
        return ",".join(f"{k}:{v:.0f}" for k, v in self.phases.items())


class Backend(Protocol):
    """Turns a blob into plaintext for one request, within a monotonic deadline."""

    def decrypt(self, blob: Blob, request: Request, deadline: float, timings: Timings) -> bytes:
        """Return the plaintext, or raise UnknownSecretError, RefusedError or UnavailableError."""
        ...


def backend_for(config: Config) -> Backend:
    """The backend the config names."""
    if config.backend == "kms":
        if config.warm_socket is not None:
            from resolver.warm import WarmBackend

            return WarmBackend(config)
        from resolver.kms import KmsBackend

        return KmsBackend(config)
    raise ConfigError(f"unknown backend {config.backend!r}")
