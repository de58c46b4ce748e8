"""The `sm:` backend's declaration: its settings, its grammar and its per-name policy.

Light on purpose: resolver/config.py composes this table on every miss, whatever the backend.
The backend itself is resolver/secretsmanager.py, imported only for an `sm:` request
(resolver/registry.py). docs/resolver.md, "Secrets Manager and Parameter Store", explains it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmskeys import contract
from kmskeys.awsname import split_selector
from kmskeys.names import validate_name
from resolver.backend import BackendSpec
from resolver.errors import ConfigError
from resolver.settings import policy, setting
from resolver.sourcename import allowlist, arn_of, check_names, path_prefix
from resolver.validators import NameRule, prefix, url

# What a secret's name may hold (Secrets Manager: letters, digits and /_+=.@-), and IAM's two
# wildcards for a pattern.
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/_+=.@-")
MAX_NAME = 512


SERVICE = "secretsmanager"


def _secrets(value: object, where: str) -> tuple[str, ...]:
    return allowlist(value, where, service=SERVICE, chars=NAME_CHARS, most=MAX_NAME)


@dataclass(frozen=True, init=False, repr=False, eq=False)
class SmSettings:
    """`sm:NAME`: a Secrets Manager secret, read with GetSecretValue on the first miss."""

    sm_prefix: str = setting(
        contract.DEFAULT_SM_PREFIX,
        prefix,
        "description namespace of Secrets Manager secrets, `SM_PREFIX:NAME[#FIELD][#stage=L]`; "
        "must differ from every other prefix",
    )
    sm_secrets: tuple[str, ...] = setting(
        (),
        _secrets,
        "the allowlist: the only secrets `sm:` reads, by full name (`prod/db`), name pattern "
        "(`prod/*`; `*` and `?` as in IAM) or full secret ARN (which pins account and Region). "
        "A name outside it is refused before any AWS call; empty, every `sm:` request is",
        shown="none",
        examples=('["prod/*", "arn:aws:secretsmanager:eu-west-1:111122223333:secret:api-AbCdEf"]',),
        note="the only secrets sm: reads (names, patterns, ARNs)",
    )
    sm_path_prefix: str = setting(
        "",
        path_prefix,
        "a path the secrets' names start with (`prod/`): `sm:db` reads the secret `prod/db`; "
        "empty, the kmskeys name is the secret's name",
        note="sm:NAME reads the secret SM_PATH_PREFIX + NAME",
    )
    sm_endpoint_url: str | None = setting(
        None,
        url,
        "`http(s)://` URL of Secrets Manager, when `endpoint_url` is KMS's alone (a VPC "
        "endpoint's own DNS name); unset, `endpoint_url` serves it too",
        shown="`endpoint_url`",
        examples=('"https://secretsmanager.eu-west-1.amazonaws.com"',),
    )
    sm: tuple[NameRule, ...] = policy(
        "per-name policy of `sm:` names (the NAME, whatever its selector; below)",
        "sm_prefix",
        ("ttl", "allow_users"),
        '[sm."prod/*"]\nttl = 600\nallow_users = ["www-data"]',
    )

    def check_sm(self, where: str, regions: tuple[str, ...]) -> None:
        """Refuse an allowlist that names secrets no region or kmskeys name can reach."""
        names = []
        for item in self.sm_secrets:
            arn = arn_of(item, SERVICE)
            if arn is None and not regions:
                raise ConfigError(f"{where}: sm_secrets names secrets by name: set region")
            names.append(item if arn is None else arn.name)
        check_names(names, self.sm_path_prefix, f"{where}: sm_secrets")


def split(rest: str) -> tuple[str, str]:
    """NAME and selector (checked by the backend, kmskeys/awsname.py) from what follows
    `PREFIX:` in an `sm:` description."""
    name, selector = split_selector(rest)
    return validate_name(name), selector


SPEC = BackendSpec("sm", SmSettings, "sm_prefix", "sm", split)
