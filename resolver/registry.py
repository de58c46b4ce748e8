"""The backends the resolver ships, and which one serves a description: from the config alone.

Each backend declares itself in a light module (resolver/spec_kms.py, spec_stored.py, spec_sm.py,
spec_ssm.py: its settings, its grammar, its policy table) and is listed here with the loader of
its code.
There is no discovery (no entry points, nothing read from what is installed): a root program
loads only the backends it ships. A backend's code is imported on demand, so a request for one
never loads another's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kmskeys.errors import InvalidNameError
from resolver import spec_kms, spec_pass, spec_sm, spec_ssm, spec_stored, spec_token
from resolver.backend import Backend, BackendSpec
from resolver.errors import ConfigError

if TYPE_CHECKING:
    from resolver.config import Config


def _kms(config: Config) -> Backend:
    from resolver.blobs import BlobBackend

    return BlobBackend(config)


def _stored(config: Config) -> Backend:
    from resolver.stored import StoredBackend

    return StoredBackend(config)


def _pass(config: Config) -> Backend:
    from resolver.passbackend import PassBackend

    return PassBackend(config)


def _token(config: Config) -> Backend:
    from resolver.tokenbackend import TokenBlobBackend

    return TokenBlobBackend(config)


def _sm(config: Config) -> Backend:
    from resolver.secretsmanager import SecretsManagerBackend

    return SecretsManagerBackend(config)


def _ssm(config: Config) -> Backend:
    from resolver.parameterstore import ParameterStoreBackend

    return ParameterStoreBackend(config)


# In order: the first is the default prefix's (`kms:`), named by a description that fits none.
SHIPPED: tuple[tuple[BackendSpec, Callable[[Config], Backend]], ...] = (
    (spec_kms.SPEC, _kms),
    (spec_stored.SPEC, _stored),
    (spec_pass.SPEC, _pass),
    (spec_token.SPEC, _token),
    (spec_sm.SPEC, _sm),
    (spec_ssm.SPEC, _ssm),
)


def prefixes(config: Config) -> tuple[str, ...]:
    """The description prefixes this config serves, one per backend."""
    return tuple(getattr(config, spec.prefix_setting) for spec, _ in SHIPPED)


def split_description(config: Config, desc: str) -> tuple[str, str, str]:
    """(prefix, NAME, qualifier) of a description this config serves; InvalidNameError if none.

    The backend's grammar splits what follows the prefix: `stored:`, `pass:`, `sm:` and `ssm:`
    descriptions have a qualifier (`stored:NAME#machine#v2`, kmskeys.stored;
    `pass:NAME#field=login`, kmskeys.passname; `sm:NAME#password`, kmskeys.awsname), which that
    backend checks, so that a refusal of it is logged under NAME.
    """
    head, sep, rest = desc.partition(":")
    for spec, _ in SHIPPED:
        if sep and head == getattr(config, spec.prefix_setting):
            name, qualifier = spec.split(rest)
            return head, name, qualifier
    raise InvalidNameError(f"key description must start with {config.prefix!r}:")


def backend_for(config: Config, prefix: str) -> Backend:
    """The backend that serves `prefix:NAME` requests under `config`."""
    for spec, load in SHIPPED:
        if prefix == getattr(config, spec.prefix_setting):
            return load(config)
    raise ConfigError(f"config {config.path} serves no prefix {prefix!r}")
