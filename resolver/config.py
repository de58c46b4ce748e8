"""The resolver's one TOML config file: root-owned, strictly validated, never the environment."""

from __future__ import annotations

import fnmatch
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kmskeys import contract
from kmskeys.contract import DEFAULT_PREFIX, DEFAULT_STORED_PREFIX
from kmskeys.errors import InvalidNameError
from kmskeys.names import validate_prefix
from kmskeys.stored import SCOPE_USER, SCOPES
from kmskeys.trust import unsafe_reason
from resolver.errors import ConfigError, RefusedError
from resolver.safefile import read_trusted

DEFAULT_PATH = Path(contract.DEFAULT_CONFIG)
DEFAULT_BLOB_DIR = Path(contract.DEFAULT_BLOB_DIR)
DEFAULT_KEYSTORE_DIR = Path(contract.DEFAULT_KEYSTORE_DIR)
DEFAULT_SYSLOG_SOCKET = Path("/dev/log")
MAX_CONFIG_BYTES = 1 << 20
MAX_TTL = 366 * 24 * 3600
MAX_NEGATIVE_TTL = 3600
MAX_DEADLINE = 60.0
MIN_DEADLINE = 0.5
DEFAULT_STATE_DIR = Path("/run/kmskeys")
MAX_CONCURRENT = 1000
MAX_RATE = 10000.0
MAX_TTL_JITTER = 0.5
BACKENDS = ("kms",)
SEALS = ("none", "kms")
FACILITIES = {"authpriv": 10, "daemon": 3, "auth": 4, "user": 1}


@dataclass(frozen=True)
class NameRule:
    """Policy for the names matching one glob (`[names."app/*"]`, or `[stored."app/*"]` for
    the keystore's names); first match wins."""

    pattern: str
    ttl: int | None = None
    allow_users: tuple[str, ...] | None = None
    # `[stored."GLOB"]` only: whose key a name is, one per uid ("user") or one per host.
    scope: str | None = None

    def allows(self, user: str | None, uid: int) -> bool:
        """True if this rule lets `user` (name, may be None) with `uid` have the secret."""
        if self.allow_users is None:
            return True
        return str(uid) in self.allow_users or (user is not None and user in self.allow_users)


@dataclass(frozen=True)
class Config:
    """Validated resolver settings (docs/resolver.md lists each key)."""

    path: Path = DEFAULT_PATH
    backend: str = "kms"
    # Strict mode (as in the AWS Encryption SDK): the only KMS keys the resolver will use, and
    # the regions it builds clients for. A blob naming another key is refused before any KMS
    # call. Discovery mode, only when asked for, accepts any key of the given accounts.
    key_arns: tuple[str, ...] = ()
    discovery: bool = False
    discovery_accounts: tuple[str, ...] = ()
    discovery_partition: str = "aws"
    region_list: tuple[str, ...] = ()
    endpoint_url: str | None = None
    profile: str | None = None
    shared_credentials_file: Path | None = None
    ttl: int = 300
    negative_ttl: int = 10
    deadline: float = 8.0
    blob_dir: Path = DEFAULT_BLOB_DIR
    prefix: str = DEFAULT_PREFIX
    allow_legacy_blobs: bool = False
    syslog_socket: Path = DEFAULT_SYSLOG_SOCKET
    syslog_facility: str = "authpriv"
    # The warm daemon's socket (`kmskeys-resolver serve`); unset, every miss decrypts cold.
    warm_socket: Path | None = None
    # Per-uid limits, checked before any expensive work: concurrent handler runs (the rest get
    # EAGAIN at once), and a token bucket for KMS calls. Their lock files live in state_dir.
    max_concurrent_per_uid: int = 4
    kms_rate_per_uid: float = 10.0
    kms_burst_per_uid: int = 100
    state_dir: Path = DEFAULT_STATE_DIR
    names: tuple[NameRule, ...] = field(default_factory=tuple)
    # The host cache (resolver/hostcache.py): one Decrypt per host and blob, whatever keyring or
    # uid asks; on an outage (EAGAIN class only) an entry up to stale_grace seconds old answers,
    # with a key timeout of stale_ttl so that KMS is retried soon. stale_grace 0: never stale.
    host_cache: bool = True
    stale_grace: int = 3600
    stale_ttl: int = 30
    # Each key's timeout is its ttl times a factor drawn from [1 - j, 1 + j], rounded to whole
    # seconds (the kernel's unit): a fleet that booted together does not expire together.
    ttl_jitter: float = 0.1
    # The keystore (`stored:NAME`, docs/dpapi.md): its namespace, where it lives, whether its
    # entries are KMS-sealed, and its per-name policy.
    stored_prefix: str = DEFAULT_STORED_PREFIX
    keystore_dir: Path = DEFAULT_KEYSTORE_DIR
    seal: str = "none"
    seal_key_arn: str | None = None
    seal_host: str | None = None
    stored: tuple[NameRule, ...] = field(default_factory=tuple)

    @property
    def regions(self) -> tuple[str, ...]:
        """The regions clients may be built for: `regions`/`region`, else the key ARNs'."""
        if self.region_list:
            return self.region_list
        return tuple(dict.fromkeys(arn.split(":")[3] for arn in self.key_arns))

    def rule_for(self, name: str, prefix: str | None = None) -> NameRule | None:
        """The first `[names."GLOB"]` section whose glob matches `name`; `[stored."GLOB"]` for a
        name under the stored prefix."""
        rules = self.stored if prefix is not None and prefix == self.stored_prefix else self.names
        return next((r for r in rules if fnmatch.fnmatchcase(name, r.pattern)), None)

    def ttl_for(self, name: str, prefix: str | None = None) -> int:
        """Seconds a resolved key for `name` stays cached."""
        rule = self.rule_for(name, prefix)
        return rule.ttl if rule is not None and rule.ttl is not None else self.ttl

    def scope_for(self, name: str) -> str:
        """The scope the `[stored."GLOB"]` policy gives a keystore name (user by default)."""
        rule = self.rule_for(name, self.stored_prefix)
        return rule.scope if rule is not None and rule.scope is not None else SCOPE_USER


def known_keys() -> tuple[str, ...]:
    """Every top-level key a config may set (the tables `names` and `stored` included)."""
    return (*_KEYS, "names", "stored")


def load(path: str | Path = DEFAULT_PATH) -> Config:
    """Read and validate the config at `path`; raise ConfigError saying what is wrong."""
    path = Path(path)
    # Whoever may write the directory may replace or remove the file in it.
    try:
        reason = unsafe_reason(os.stat(path.parent))
    except OSError as exc:
        raise ConfigError(f"config directory {path.parent}: {exc.strerror}") from None
    if reason:
        raise ConfigError(f"config directory {path.parent} is unsafe: {reason}")
    try:
        raw = read_trusted(path, MAX_CONFIG_BYTES, "config")
    except RefusedError as exc:
        raise ConfigError(exc.reason) from None
    return parse_text(raw, path)


def log_settings(path: str | Path) -> tuple[Path, str] | None:
    """`syslog_socket` and `syslog_facility` of a trusted config that fails to load otherwise
    (a typo elsewhere), so the handler's line about it goes where the operator reads; None when
    the file is not trusted, not TOML, or these two are not valid themselves."""
    path = Path(path)
    try:
        if unsafe_reason(os.stat(path.parent)):
            return None
        data = tomllib.loads(read_trusted(path, MAX_CONFIG_BYTES, "config").decode("utf-8"))
        socket_path = _abs_path(data.get("syslog_socket", str(DEFAULT_SYSLOG_SOCKET)), "")
        facility = _choice(tuple(FACILITIES))(data.get("syslog_facility", "authpriv"), "")
    except (OSError, ValueError, RefusedError):
        return None
    return socket_path, facility


def parse_text(raw: bytes, path: Path = DEFAULT_PATH) -> Config:
    """Build a Config from the file's bytes; anything but valid settings is ConfigError."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config {path}: not valid TOML ({exc})") from None
    return parse(data, path)


def parse(data: Mapping[str, object], path: Path = DEFAULT_PATH) -> Config:
    """Build a Config from parsed TOML; unknown keys and bad values are errors."""
    where = f"config {path}"
    values: dict[str, object] = {}
    for key, value in data.items():
        if key in ("names", "stored"):
            values[key] = _names(value, where, key)
            continue
        check = _KEYS.get(key)
        if check is None:
            raise ConfigError(f"{where}: unknown key {key!r}", key=key)
        field_name = "region_list" if key in ("region", "regions") else key
        if field_name in values:
            raise ConfigError(f"{where}: set region or regions, not both", key=key)
        try:
            values[field_name] = check(value, f"{where}: {key}")
        except ConfigError as exc:
            exc.key = key
            raise
    config = Config(path=path, **values)  # type: ignore[arg-type]
    _check_keys(config, where)
    _check_stored(config, where)
    return config


def _check_keys(config: Config, where: str) -> None:
    if config.discovery:
        if config.key_arns:
            raise ConfigError(f"{where}: set key_arns (strict mode) or discovery, not both")
        if not config.discovery_accounts:
            raise ConfigError(f"{where}: discovery needs discovery_accounts (AWS account IDs)")
        if not config.region_list:
            raise ConfigError(f"{where}: discovery needs region (or regions)")
        return
    if config.discovery_accounts:
        raise ConfigError(f"{where}: discovery_accounts is set but discovery is not true")
    for arn in config.key_arns:
        region = arn.split(":")[3]
        if config.region_list and region not in config.region_list:
            raise ConfigError(f"{where}: key_arns: {arn} is in {region}, not in regions")


def _check_stored(config: Config, where: str) -> None:
    if config.stored_prefix == config.prefix:
        raise ConfigError(f"{where}: stored_prefix must differ from prefix ({config.prefix!r})")
    if config.seal == "kms" and (config.seal_key_arn is None or config.seal_host is None):
        raise ConfigError(
            f'{where}: seal = "kms" needs seal_key_arn (the seal key) and seal_host (this '
            "instance's ARN, arn:aws:ec2:REGION:ACCOUNT:instance/ID)"
        )


def _names(value: object, where: str, table: str = "names") -> tuple[NameRule, ...]:
    if not isinstance(value, dict):
        raise ConfigError(f'{where}: {table} must be a table of [{table}."GLOB"] sections')
    rules = []
    for pattern, section in value.items():
        here = f"{where}: {table}.{pattern!r}"
        if not isinstance(section, dict):
            raise ConfigError(f"{here} must be a table")
        ttl: int | None = None
        users: tuple[str, ...] | None = None
        scope: str | None = None
        for key, item in section.items():
            if key == "ttl":
                ttl = _int(1, MAX_TTL)(item, f"{here}.ttl")
            elif key == "allow_users":
                users = _users(item, f"{here}.allow_users")
            elif key == "scope" and table == "stored":
                scope = _choice(SCOPES)(item, f"{here}.scope")
            else:
                raise ConfigError(f"{here}: unknown key {key!r}")
        rules.append(NameRule(pattern, ttl, users, scope))
    return tuple(rules)


def _users(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of user names or uids")
    users = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, str | int) or item == "":
            raise ConfigError(f"{where}: {item!r} is not a user name or uid")
        users.append(str(item))
    return tuple(users)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string")
    return value


def _abs_path(value: object, where: str) -> Path:
    text = _str(value, where)
    if not text.startswith("/"):
        raise ConfigError(f"{where} must be an absolute path")
    return Path(text)


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false")
    return value


def _int(low: int, high: int) -> Callable[[object, str], int]:
    def check(value: object, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{where} must be a whole number of seconds in [{low}, {high}]")
        return value

    return check


def _deadline(value: object, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not MIN_DEADLINE <= value <= MAX_DEADLINE
    ):
        raise ConfigError(
            f"{where} must be a number of seconds in [{MIN_DEADLINE}, {MAX_DEADLINE}]"
        )
    return float(value)


def _endpoint(value: object, where: str) -> str:
    text = _str(value, where)
    if not text.startswith(("https://", "http://")):
        raise ConfigError(f"{where} must be an http:// or https:// URL")
    return text


def _prefix(value: object, where: str) -> str:
    try:
        return validate_prefix(_str(value, where))
    except InvalidNameError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _choice(options: tuple[str, ...]) -> Callable[[object, str], str]:
    def check(value: object, where: str) -> str:
        if value not in options:
            raise ConfigError(f"{where} must be one of {', '.join(options)}")
        return str(value)

    return check


def _region(value: object, where: str) -> str:
    text = _str(value, where)
    if not (text[0].isalpha() and all(ch.isalnum() or ch == "-" for ch in text) and len(text) < 32):
        raise ConfigError(f"{where}: {text!r} is not an AWS region name")
    return text


def _regions(value: object, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where} must be a region name or a non-empty list of them")
    return tuple(dict.fromkeys(_region(item, where) for item in items))


def _key_arn(value: object, where: str) -> str:
    text = _str(value, where)
    parts = text.split(":")
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
            f"{where}: {text!r} is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID; "
            "aliases are not accepted: a key ARN names exactly one key)"
        )
    _region(parts[3], where)
    return text


def _key_arns(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of KMS key ARNs")
    return tuple(dict.fromkeys(_key_arn(item, where) for item in value))


def _accounts(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of 12-digit AWS account IDs")
    accounts = []
    for item in value:
        if not isinstance(item, str) or len(item) != 12 or not item.isdigit():
            raise ConfigError(f"{where}: {item!r} is not a 12-digit AWS account ID")
        accounts.append(item)
    return tuple(accounts)


def _rate(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_RATE:
        raise ConfigError(f"{where} must be a number of calls per second in (0, {MAX_RATE:g}]")
    return float(value)


def _fraction(high: float) -> Callable[[object, str], float]:
    def check(value: object, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
            raise ConfigError(f"{where} must be a fraction in [0, {high:g}] (0.1 is 10 %)")
        return float(value)

    return check


def _count(low: int, high: int) -> Callable[[object, str], int]:
    def check(value: object, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{where} must be a whole number in [{low}, {high}]")
        return value

    return check


_KEYS: dict[str, Callable[[object, str], object]] = {
    "backend": _choice(BACKENDS),
    "key_arns": _key_arns,
    "discovery": _bool,
    "discovery_accounts": _accounts,
    "discovery_partition": _choice(("aws", "aws-cn", "aws-us-gov")),
    "region": _regions,
    "regions": _regions,
    "endpoint_url": _endpoint,
    "profile": _str,
    "shared_credentials_file": _abs_path,
    "ttl": _int(1, MAX_TTL),
    "negative_ttl": _int(1, MAX_NEGATIVE_TTL),
    "deadline": _deadline,
    "blob_dir": _abs_path,
    "prefix": _prefix,
    "allow_legacy_blobs": _bool,
    "syslog_socket": _abs_path,
    "syslog_facility": _choice(tuple(FACILITIES)),
    "warm_socket": _abs_path,
    "max_concurrent_per_uid": _count(1, MAX_CONCURRENT),
    "kms_rate_per_uid": _rate,
    "kms_burst_per_uid": _count(1, MAX_CONCURRENT * 100),
    "state_dir": _abs_path,
    "host_cache": _bool,
    "stale_grace": _int(0, MAX_TTL),
    "stale_ttl": _int(1, MAX_NEGATIVE_TTL),
    "ttl_jitter": _fraction(MAX_TTL_JITTER),
    "stored_prefix": _prefix,
    "keystore_dir": _abs_path,
    "seal": _choice(SEALS),
    "seal_key_arn": _key_arn,
    "seal_host": _str,
}
