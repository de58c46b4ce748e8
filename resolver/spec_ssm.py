"""The `ssm:` backend's declaration: its settings, its grammar and its per-name policy.

Light on purpose: resolver/config.py composes this table on every miss, whatever the backend.
The backend itself is resolver/parameterstore.py, imported only for an `ssm:` request
(resolver/registry.py). docs/resolver.md, "Secrets Manager and Parameter Store", explains it.

The kmskeys name of a parameter is its name without the leading `/` (`/app/prod/db` is
`ssm:app/prod/db`), below `ssm_path_prefix`; a name with a `/` is asked for as the hierarchical
`/NAME`, one without as the simple `NAME` (AWS takes `/db` and `db` for the same parameter).
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

SERVICE = "ssm"
# What a parameter's name may hold (letters, digits, _ . - and / for the hierarchy), and IAM's
# two wildcards for a pattern.
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/_.-")
MAX_NAME = 1011  # AWS: 2048 with the ARN's own part; 1011 for the name itself
TYPES = ("SecureString", "String", "StringList")


def _parameters(value: object, where: str) -> tuple[str, ...]:
    return allowlist(value, where, service=SERVICE, chars=NAME_CHARS, most=MAX_NAME)


def _types(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or any(item not in TYPES for item in value):
        raise ConfigError(f"{where} must be a non-empty list of {', '.join(TYPES)}")
    return tuple(dict.fromkeys(value))


@dataclass(frozen=True, init=False, repr=False, eq=False)
class SsmSettings:
    """`ssm:NAME`: a Parameter Store parameter, read with GetParameter (decrypted)."""

    ssm_prefix: str = setting(
        contract.DEFAULT_SSM_PREFIX,
        prefix,
        "description namespace of Parameter Store parameters, `SSM_PREFIX:NAME[#VERSION|#LABEL]`; "
        "must differ from every other prefix",
    )
    ssm_parameters: tuple[str, ...] = setting(
        (),
        _parameters,
        "the allowlist: the only parameters `ssm:` reads, by full name (`/app/prod/db`), name "
        "pattern (`/app/prod/*`; `*` and `?` as in IAM) or full parameter ARN (which pins "
        "account and Region). A name outside it is refused before any AWS call; empty, every "
        "`ssm:` request is",
        shown="none",
        examples=('["/app/prod/*"]',),
        note="the only parameters ssm: reads (names, patterns, ARNs)",
    )
    ssm_path_prefix: str = setting(
        "",
        path_prefix,
        "a path the parameters' names start with, without its leading `/` (`app/prod/`): "
        "`ssm:db` reads `/app/prod/db`; empty, the kmskeys name is the parameter's name",
        note="ssm:NAME reads /SSM_PATH_PREFIX + NAME",
    )
    ssm_types: tuple[str, ...] = setting(
        ("SecureString", "String"),
        _types,
        "the parameter types served: `SecureString`, `String`, `StringList` (its value is the "
        "comma-separated text, served as is). Another type is refused after the call, and "
        "nothing of it is kept",
        note="a parameter of another type is refused",
    )
    ssm_endpoint_url: str | None = setting(
        None,
        url,
        "`http(s)://` URL of Systems Manager, when `endpoint_url` is KMS's alone; unset, "
        "`endpoint_url` serves it too",
        shown="`endpoint_url`",
        examples=('"https://ssm.eu-west-1.amazonaws.com"',),
    )
    ssm: tuple[NameRule, ...] = policy(
        "per-name policy of `ssm:` names (the NAME, whatever its selector; below)",
        "ssm_prefix",
        ("ttl", "allow_users"),
        '[ssm."app/prod/*"]\nallow_users = ["www-data"]',
    )

    def check_ssm(self, where: str, regions: tuple[str, ...]) -> None:
        """Refuse an allowlist that names parameters no region or kmskeys name can reach."""
        by_name = [item for item in self.ssm_parameters if arn_of(item, SERVICE) is None]
        if by_name and not regions:
            raise ConfigError(f"{where}: ssm_parameters names parameters: set region")
        names = [entry_name(item) for item in self.ssm_parameters]
        check_names(names, self.ssm_path_prefix, f"{where}: ssm_parameters")


def entry_name(item: str) -> str:
    """An allowlist entry's name in the form kmskeys matches: no leading `/`."""
    arn = arn_of(item, SERVICE)
    return item.lstrip("/") if arn is None else arn.name


def split(rest: str) -> tuple[str, str]:
    """NAME and selector (checked by the backend, kmskeys/awsname.py) from what follows
    `PREFIX:` in an `ssm:` description."""
    name, selector = split_selector(rest)
    return validate_name(name), selector


SPEC = BackendSpec("ssm", SsmSettings, "ssm_prefix", "ssm", split)
