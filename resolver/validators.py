"""The validators of setting values: (value, where) -> the value, or ConfigError naming where.

And the per-name policy rules (`[names."GLOB"]`, `[stored."GLOB"]` sections) they build. The
settings tables (resolver/settings.py, resolver/spec_*.py) name a validator for each field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmskeys.contract import UNIT_NAME_CHARS, UNIT_NAME_MAX, UNIT_SUFFIXES
from kmskeys.errors import InvalidNameError
from kmskeys.names import validate_prefix
from kmskeys.stored import KEY_SIZE_MAX, KEY_SIZE_MIN, SCOPES
from resolver.errors import ConfigError

Check = Callable[[object, str], Any]

MAX_TTL = 366 * 24 * 3600
MAX_NEGATIVE_TTL = 3600
MIN_DEADLINE = 0.5
MAX_DEADLINE = 60.0
MAX_CONCURRENT = 1000
MAX_RATE = 10000.0
MAX_TTL_JITTER = 0.5
# How long kmskeys-gate waits for the resolver daemon to accept a request (not to answer it).
MIN_DAEMON_WAIT = 0.01
MAX_DAEMON_WAIT = 5.0


@dataclass(frozen=True)
class NameRule:
    """Policy for the names matching one glob (`[names."app/*"]`, or `[stored."app/*"]` for
    the keystore's names); first match wins."""

    pattern: str
    ttl: int | None = None
    allow_users: tuple[str, ...] | None = None
    # `[stored."GLOB"]` only: whose key a name is, one per uid ("user") or one per host.
    scope: str | None = None
    # `[stored."GLOB"]` only: the size in bytes of the keys made for these names.
    key_size: int | None = None
    # Every backend's: which programs of an allowed user may have the name
    # (resolver/programpolicy.py); None: not set.
    allow_units: tuple[str, ...] | None = None
    allow_cgroups: tuple[str, ...] | None = None
    allow_exe: tuple[str, ...] | None = None

    @property
    def binds_programs(self) -> bool:
        """True if the rule sets a program key: the name answers only to the programs listed
        (resolver/binding.py)."""
        return not (
            self.allow_units is None and self.allow_cgroups is None and self.allow_exe is None
        )

    def allows(self, user: str | None, uid: int) -> bool:
        """True if this rule lets `user` (name, may be None) with `uid` have the secret."""
        if self.allow_users is None:
            return True
        return str(uid) in self.allow_users or (user is not None and user in self.allow_users)


def text(value: object, where: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string")
    return value


def abs_path(value: object, where: str) -> Path:
    """An absolute path."""
    path = text(value, where)
    if not path.startswith("/"):
        raise ConfigError(f"{where} must be an absolute path")
    return Path(path)


def boolean(value: object, where: str) -> bool:
    """true or false."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false")
    return value


def _whole(value: object, low: int, high: int, where: str, unit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where} must be a whole number{unit} in [{low}, {high}]")
    return value


def seconds(low: int, high: int) -> Check:
    """A whole number of seconds in [low, high]."""
    return lambda value, where: _whole(value, low, high, where, " of seconds")


def count(low: int, high: int) -> Check:
    """A whole number in [low, high]."""
    return lambda value, where: _whole(value, low, high, where, "")


def duration(low: float, high: float) -> Check:
    """A number of seconds (a fraction allowed) in [low, high]."""

    def check(value: object, where: str) -> float:
        number = _number(value)
        if number is None or not low <= number <= high:
            raise ConfigError(f"{where} must be a number of seconds in [{low:g}, {high:g}]")
        return number

    return check


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def deadline(value: object, where: str) -> float:
    """Seconds in [MIN_DEADLINE, MAX_DEADLINE]."""
    number = _number(value)
    if number is None or not MIN_DEADLINE <= number <= MAX_DEADLINE:
        raise ConfigError(
            f"{where} must be a number of seconds in [{MIN_DEADLINE}, {MAX_DEADLINE}]"
        )
    return number


def daemon_wait(value: object, where: str) -> float:
    """Seconds in [MIN_DAEMON_WAIT, MAX_DAEMON_WAIT]."""
    number = _number(value)
    if number is None or not MIN_DAEMON_WAIT <= number <= MAX_DAEMON_WAIT:
        raise ConfigError(
            f"{where} must be a number of seconds in [{MIN_DAEMON_WAIT}, {MAX_DAEMON_WAIT}]"
        )
    return number


def rate(value: object, where: str) -> float:
    """Calls per second in (0, MAX_RATE]."""
    number = _number(value)
    if number is None or not 0 < number <= MAX_RATE:
        raise ConfigError(f"{where} must be a number of calls per second in (0, {MAX_RATE:g}]")
    return number


def fraction(high: float) -> Check:
    """A fraction in [0, high]."""

    def check(value: object, where: str) -> float:
        number = _number(value)
        if number is None or not 0 <= number <= high:
            raise ConfigError(f"{where} must be a fraction in [0, {high:g}] (0.1 is 10 %)")
        return number

    return check


def choice(options: tuple[str, ...]) -> Check:
    """One of `options`."""

    def check(value: object, where: str) -> str:
        if value not in options:
            raise ConfigError(f"{where} must be one of {', '.join(options)}")
        return str(value)

    return check


def url(value: object, where: str) -> str:
    """An http:// or https:// URL."""
    found = text(value, where)
    if not found.startswith(("https://", "http://")):
        raise ConfigError(f"{where} must be an http:// or https:// URL")
    return found


def prefix(value: object, where: str) -> str:
    """A description prefix (kmskeys.names.validate_prefix)."""
    try:
        return validate_prefix(text(value, where))
    except InvalidNameError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def region(value: object, where: str) -> str:
    """An AWS region name."""
    found = text(value, where)
    if not (
        found[0].isalpha() and all(ch.isalnum() or ch == "-" for ch in found) and len(found) < 32
    ):
        raise ConfigError(f"{where}: {found!r} is not an AWS region name")
    return found


def regions(value: object, where: str) -> tuple[str, ...]:
    """A region name or a non-empty list of them."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where} must be a region name or a non-empty list of them")
    return tuple(dict.fromkeys(region(item, where) for item in items))


def key_arn(value: object, where: str) -> str:
    """A KMS key ARN (never an alias: a key ARN names exactly one key)."""
    found = text(value, where)
    parts = found.split(":")
    if (
        len(parts) != 6
        or parts[0] != "arn"
        or not parts[1].startswith("aws")
        or parts[2] != "kms"
        or not parts[4].isdigit()
        or len(parts[4]) != 12
        or not parts[5].startswith("key/")
        or len(parts[5]) <= 4
    ):
        raise ConfigError(
            f"{where}: {found!r} is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID; "
            "aliases are not accepted: a key ARN names exactly one key)"
        )
    region(parts[3], where)
    return found


def key_arns(value: object, where: str) -> tuple[str, ...]:
    """A non-empty list of KMS key ARNs."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of KMS key ARNs")
    return tuple(dict.fromkeys(key_arn(item, where) for item in value))


def accounts(value: object, where: str) -> tuple[str, ...]:
    """A non-empty list of 12-digit AWS account IDs."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of 12-digit AWS account IDs")
    found = []
    for item in value:
        if not isinstance(item, str) or len(item) != 12 or not item.isdigit():
            raise ConfigError(f"{where}: {item!r} is not a 12-digit AWS account ID")
        found.append(item)
    return tuple(found)


def users(value: object, where: str) -> tuple[str, ...]:
    """A list of user names or uids."""
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of user names or uids")
    found = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, str | int) or item == "":
            raise ConfigError(f"{where}: {item!r} is not a user name or uid")
        found.append(str(item))
    return tuple(found)


# --- The program keys of every policy table (resolver/programpolicy.py matches them) ----------
PROGRAM_KEYS = ("allow_units", "allow_cgroups", "allow_exe")
# systemd's unit name alphabet, plus glob characters.
_UNIT_CHARS = frozenset(UNIT_NAME_CHARS + "*?[]!")
_UNIT_ALPHABET = "letters, digits, ':-_.\\@' and the glob characters '*?[]!'"
_MAX_PATH = 4096


def check_units(value: object, where: str) -> tuple[str, ...]:
    """`allow_units`: a non-empty list of unit names or globs ending in a unit suffix."""
    return _list(value, where, _unit)


def check_cgroups(value: object, where: str) -> tuple[str, ...]:
    """`allow_cgroups`: a non-empty list of absolute cgroup path globs."""
    return _list(value, where, _cgroup)


def check_exes(value: object, where: str) -> tuple[str, ...]:
    """`allow_exe`: a non-empty list of exact, normalized absolute paths."""
    return _list(value, where, _exe)


PROGRAM_RULE_CHECKS: dict[str, Check] = {
    "allow_units": check_units,
    "allow_cgroups": check_cgroups,
    "allow_exe": check_exes,
}


def _list(value: object, where: str, check: Callable[[str, str], None]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of strings")
    items = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{where}: {item!r} is not a non-empty string")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in item):
            raise ConfigError(f"{where}: {item!r} holds a control character")
        check(item, where)
        items.append(item)
    return tuple(items)


def _unit(item: str, where: str) -> None:
    if len(item) > UNIT_NAME_MAX or not _UNIT_CHARS.issuperset(item):
        raise ConfigError(f"{where}: {item!r} is not a unit name or glob ({_UNIT_ALPHABET})")
    if not any(item.endswith(s) and len(item) > len(s) for s in UNIT_SUFFIXES):
        raise ConfigError(
            f"{where}: {item!r} must end in a literal unit suffix that holds processes "
            f"({', '.join(UNIT_SUFFIXES)}); match a slice with allow_cgroups"
        )


def _cgroup(item: str, where: str) -> None:
    if len(item) > _MAX_PATH or not item.startswith("/"):
        raise ConfigError(f"{where}: {item!r} must be an absolute cgroup path glob")
    parts = [] if item == "/" else item.split("/")[1:]
    if any(part in ("", ".", "..") for part in parts):
        raise ConfigError(f"{where}: {item!r} has an empty, '.' or '..' component")
    if any("**" in part and part != "**" for part in parts):
        raise ConfigError(f"{where}: {item!r}: '**' must be a whole path component")


def _exe(item: str, where: str) -> None:
    if len(item) > _MAX_PATH or not item.startswith("/") or item.startswith("//"):
        raise ConfigError(f"{where}: {item!r} must be an absolute path")
    if os.path.normpath(item) != item:
        raise ConfigError(f"{where}: {item!r} is not normalized (no '.', '..', '//' or '/' end)")
    if any(ch in item for ch in "*?["):
        raise ConfigError(f"{where}: {item!r}: allow_exe takes exact paths, not globs")


RULE_CHECKS: dict[str, Check] = {
    "ttl": seconds(1, MAX_TTL),
    "allow_users": users,
    "scope": choice(SCOPES),
    "key_size": count(KEY_SIZE_MIN, KEY_SIZE_MAX),
    **PROGRAM_RULE_CHECKS,
}


def name_rules(value: object, where: str, rule_keys: tuple[str, ...]) -> tuple[NameRule, ...]:
    """The `[TABLE."GLOB"]` sections of a policy table, each taking `rule_keys`."""
    table = where.rpartition(": ")[2]
    if not isinstance(value, dict):
        raise ConfigError(f'{where} must be a table of [{table}."GLOB"] sections')
    rules = []
    for pattern, section in value.items():
        here = f"{where}.{pattern!r}"
        if not isinstance(section, dict):
            raise ConfigError(f"{here} must be a table")
        found: dict[str, Any] = {}
        for key, item in section.items():
            if key not in rule_keys:
                raise ConfigError(f"{here}: unknown key {key!r}")
            found[key] = RULE_CHECKS[key](item, f"{here}.{key}")
        rules.append(NameRule(pattern, **found))
    return tuple(rules)
