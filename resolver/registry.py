"""Which backend serves a request: picked by the description's prefix, from the config alone.

The backends are imported on demand, so a request for one never loads another's code.
"""

from __future__ import annotations

from resolver.backend import SecretBackend
from resolver.config import Config
from resolver.errors import ConfigError


def prefixes(config: Config) -> tuple[str, ...]:
    """The description prefixes this config serves."""
    return (config.prefix,)


def backend_for(config: Config, prefix: str) -> SecretBackend:
    """The backend that serves `prefix:NAME` requests under `config`."""
    if prefix == config.prefix:
        from resolver.blobs import BlobBackend

        return BlobBackend(config)
    raise ConfigError(f"config {config.path} serves no prefix {prefix!r}")
