"""Which backend serves a request: picked by the description's prefix, from the config alone.

The backends are imported on demand, so a request for one never loads another's code.
"""

from __future__ import annotations

from kmskeys.names import parse_description, validate_name
from kmskeys.stored import split_qualifier
from resolver.backend import SecretBackend
from resolver.config import Config
from resolver.errors import ConfigError


def prefixes(config: Config) -> tuple[str, ...]:
    """The description prefixes this config serves: `kms:` blobs and the `stored:` keystore."""
    return (config.prefix, config.stored_prefix)


def split_description(config: Config, desc: str) -> tuple[str, str, str]:
    """(prefix, NAME, qualifier) of a description this config serves; InvalidNameError if none.

    Only `stored:` descriptions have a qualifier (`stored:NAME#machine#v2`, kmskeys.stored); the
    stored backend checks it, so that a refusal of the qualifier is logged under NAME.
    """
    head = config.stored_prefix + ":"
    if desc.startswith(head):
        name, qualifier = split_qualifier(desc[len(head) :])
        return config.stored_prefix, validate_name(name), qualifier
    return config.prefix, parse_description(desc, config.prefix), ""


def backend_for(config: Config, prefix: str) -> SecretBackend:
    """The backend that serves `prefix:NAME` requests under `config`."""
    if prefix == config.prefix:
        from resolver.blobs import BlobBackend

        return BlobBackend(config)
    if prefix == config.stored_prefix:
        from resolver.stored import StoredBackend

        return StoredBackend(config)
    raise ConfigError(f"config {config.path} serves no prefix {prefix!r}")
