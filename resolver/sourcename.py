"""Names of AWS secrets and parameters as the config lists them: allowlists, ARNs, path prefixes.

Shared by the `sm:` and `ssm:` declarations (resolver/spec_sm.py, resolver/spec_ssm.py), so
light: composed into the config on every miss. An allowlist entry is a full name, a pattern
(IAM's `*` and `?`, matched with fnmatchcase: `*` crosses `/`, as in IAM) or a full ARN of the
service, which pins the account and the Region. A kmskeys NAME maps to the AWS name
PATH_PREFIX + NAME; the request never supplies an account, a Region, an endpoint or an ARN
(`:` is outside the name alphabet, so no NAME is an ARN).
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from kmskeys.errors import InvalidNameError
from kmskeys.names import validate_name
from resolver.errors import ConfigError
from resolver.validators import region

WILDCARDS = frozenset("*?")
PARTITIONS = ("aws", "aws-cn", "aws-us-gov")
# A secret's ARN ends in its name, a hyphen and six characters Secrets Manager adds.
SECRET_SUFFIX = 7
_SUFFIX_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


class Arn:
    """The parts of an ARN this module accepts: a secret's or a parameter's."""

    __slots__ = ("account", "name", "partition", "region", "service", "text")

    def __init__(self, text: str) -> None:
        parts = text.split(":")
        if len(parts) < 6 or parts[0] != "arn" or parts[1] not in PARTITIONS:
            raise ValueError("not an ARN")
        self.text, self.partition, self.service = text, parts[1], parts[2]
        self.region, self.account = parts[3], parts[4]
        if not (len(self.account) == 12 and self.account.isdigit()):
            raise ValueError("no 12-digit account")
        if self.service == "secretsmanager" and len(parts) == 7 and parts[5] == "secret":
            named, suffix = parts[6][:-SECRET_SUFFIX], parts[6][-SECRET_SUFFIX:]
            if suffix[:1] != "-" or not _SUFFIX_CHARS.issuperset(suffix[1:]) or not named:
                raise ValueError("a secret ARN ends in -XXXXXX (six letters or digits)")
            self.name = named
        elif self.service == "ssm" and len(parts) == 6 and parts[5].startswith("parameter/"):
            self.name = parts[5].removeprefix("parameter/")
            if not self.name or self.name.startswith("/"):
                raise ValueError("no parameter name")
        else:
            raise ValueError("not a secret or parameter ARN")


def arn_of(item: str, service: str) -> Arn | None:
    """The ARN `item` is, if it is one of `service`'s; None for a name or pattern."""
    if not item.startswith("arn:"):
        return None
    found = Arn(item)
    if found.service != service:
        raise ValueError(f"not a {service} ARN")
    return found


def allowlist(
    value: object, where: str, *, service: str, chars: frozenset[str], most: int
) -> tuple[str, ...]:
    """A list of names, patterns (with `*`, `?`) and full ARNs of `service`."""
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of names, patterns or ARNs")
    found = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{where}: {item!r} is not a name, pattern or ARN")
        try:
            arn = arn_of(item, service)
        except ValueError as exc:
            raise ConfigError(f"{where}: {item!r} is not a full {service} ARN ({exc})") from None
        if arn is not None:
            region(arn.region, where)
        elif len(item) > most or not (chars | WILDCARDS).issuperset(item):
            raise ConfigError(
                f"{where}: {item!r} must be an ARN, or a name or pattern of at most {most} "
                f"characters of {''.join(sorted(chars))} and the wildcards * ?"
            )
        found.append(item)
    return tuple(dict.fromkeys(found))


def path_prefix(value: object, where: str) -> str:
    """Empty, or kmskeys path segments each ending in `/` (`prod/`, `team/prod/`)."""
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    if value and not (value.endswith("/") and _valid_name(value[:-1])):
        raise ConfigError(
            f"{where}: {value!r} must be empty, or name segments each ending in / (prod/)"
        )
    return value


def _valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except InvalidNameError:
        return False
    return True


def check_names(names: Iterable[str], prefix: str, where: str) -> None:
    """Refuse an exact name (no wildcard) that no kmskeys NAME can ask for under `prefix`."""
    for name in names:
        if WILDCARDS & set(name):
            continue
        if not name.startswith(prefix) or not _valid_name(name[len(prefix) :]):
            raise ConfigError(
                f"{where}: {name!r} cannot be asked for: a kmskeys name is the part after the "
                f"path prefix {prefix!r}, of letters, digits and _ . / @ + - (no '..', no empty "
                "segment, at most 200 bytes)"
            )


def allowed(entries: Iterable[str], name: str, service: str) -> Arn | str | None:
    """The entry that admits the AWS name `name`: an ARN naming it (first), else the first
    name or pattern matching it; None when none does."""
    patterns = []
    for entry in entries:
        arn = arn_of(entry, service)
        if arn is None:
            patterns.append(entry)
        elif arn.name == name:
            return arn
    return next((p for p in patterns if fnmatchcase(name, p)), None)
