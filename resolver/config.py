"""The resolver's one TOML config file: root-owned, strictly validated, never the environment.

Config is composed of the components' tables (resolver/settings.py: each field declares its
key, validator, docs line and template note), so a setting is written once. COMPONENTS orders
them for the docs table and install's template (resolver/config_text.py).
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmskeys import contract, fileio
from kmskeys.stored import SCOPE_USER
from resolver.errors import ConfigError
from resolver.settings import (
    DEFAULT_STATE_DIR,
    DEFAULT_SYSLOG_SOCKET,
    FACILITIES,
    AwsSettings,
    Component,
    CoreSettings,
    DaemonSettings,
    HostCacheSettings,
    LimitSettings,
    declared,
    toml_keys,
)
from resolver.spec_kms import DEFAULT_BLOB_DIR, KmsSettings
from resolver.spec_pass import PassSettings
from resolver.spec_sm import SmSettings
from resolver.spec_ssm import SsmSettings
from resolver.spec_stored import DEFAULT_KEYSTORE_DIR, StoredSettings
from resolver.spec_token import Pkcs11Settings
from resolver.validators import NameRule, abs_path, choice

__all__ = [
    "DEFAULT_BLOB_DIR",
    "DEFAULT_KEYSTORE_DIR",
    "DEFAULT_PATH",
    "DEFAULT_STATE_DIR",
    "DEFAULT_SYSLOG_SOCKET",
    "FACILITIES",
    "Config",
    "NameRule",
    "known_keys",
    "load",
    "log_settings",
    "parse",
    "parse_text",
]

DEFAULT_PATH = Path(contract.DEFAULT_CONFIG)
MAX_CONFIG_BYTES = 1 << 20
# Keys a config may still hold, accepted with these values and otherwise ignored; `kmskeys-
# resolver check` lists them as obsolete, with what to do.
OBSOLETE: dict[str, tuple[tuple[str, ...], str]] = {
    # Validated and never read until 0.1: `kms` was its only value, and each backend is chosen
    # by its own description prefix.
    "backend": (("kms",), "remove it: each backend is chosen by its own prefix"),
}


@dataclass(frozen=True)
class Config(
    Pkcs11Settings,
    PassSettings,
    SsmSettings,
    SmSettings,
    StoredSettings,
    KmsSettings,
    DaemonSettings,
    HostCacheSettings,
    LimitSettings,
    AwsSettings,
    CoreSettings,
):
    """Validated resolver settings (docs/resolver.md lists each key)."""

    path: Path = DEFAULT_PATH
    # Obsolete keys the file sets (OBSOLETE): accepted, ignored, reported by selfcheck.
    obsolete: tuple[str, ...] = ()

    @property
    def regions(self) -> tuple[str, ...]:
        """The regions clients may be built for: `regions`/`region`, else the key ARNs'."""
        if self.region_list:
            return self.region_list
        return tuple(dict.fromkeys(arn.split(":")[3] for arn in self.key_arns))

    def rule_for(self, name: str, prefix: str | None = None) -> NameRule | None:
        """The first policy section whose glob matches `name`: `[names."GLOB"]` for a `kms:`
        name (the default), the table of the backend serving `prefix` otherwise."""
        rules = self.names
        for prefix_setting, table, _ in _POLICY_TABLES:
            if prefix is not None and getattr(self, prefix_setting) == prefix:
                rules = getattr(self, table)
        return next((r for r in rules if fnmatch.fnmatchcase(name, r.pattern)), None)

    def policy_table(self, prefix: str | None) -> str:
        """The TOML name of the policy table that governs names under `prefix`."""
        return next(
            (key for setting, _, key in _POLICY_TABLES if getattr(self, setting) == prefix),
            "names",
        )

    def ttl_for(self, name: str, prefix: str | None = None) -> int:
        """Seconds a resolved key for `name` stays cached."""
        rule = self.rule_for(name, prefix)
        return rule.ttl if rule is not None and rule.ttl is not None else self.ttl

    def scope_for(self, name: str) -> str:
        """The scope the `[stored."GLOB"]` policy gives a keystore name (user by default)."""
        rule = self.rule_for(name, self.stored_prefix)
        return rule.scope if rule is not None and rule.scope is not None else SCOPE_USER


COMPONENTS = (
    Component("resolver core", CoreSettings),
    Component("AWS: every call the resolver makes (resolver/gateway.py)", AwsSettings),
    Component("the kms: backend (blobs)", KmsSettings),
    Component("per-uid limits", LimitSettings),
    Component("the host cache", HostCacheSettings),
    Component("the resolver daemon (resolver/daemon.py)", DaemonSettings),
    Component("the stored: backend (the keystore, docs/dpapi.md)", StoredSettings),
    Component("the pass: backend (a user's password store, docs/tokens.md)", PassSettings),
    Component(
        "the token: backend and the pkcs11 seal (a PKCS#11 token, docs/tokens.md)", Pkcs11Settings
    ),
    Component("the sm: backend (Secrets Manager)", SmSettings),
    Component("the ssm: backend (Parameter Store)", SsmSettings),
)
# TOML key -> (field name, validator), from every component's declaration.
_KEYS = {
    key: (f.name, meta.check)
    for component in COMPONENTS
    for f, meta in declared(component.settings)
    for key in toml_keys(f, meta)
}
# (prefix setting, policy table field, its TOML name) of each backend.
_POLICY_TABLES = tuple(
    (meta.prefix_setting, f.name, toml_keys(f, meta)[0])
    for f, meta in declared(Config)
    if meta.rule_keys
)
_PREFIX_SETTINGS = tuple(setting for setting, _, _ in _POLICY_TABLES)


def known_keys() -> tuple[str, ...]:
    """Every top-level key a config may set (the policy tables `names` and `stored` included)."""
    return tuple(_KEYS)


def load(path: str | Path = DEFAULT_PATH) -> Config:
    """Read and validate the config at `path`; raise ConfigError saying what is wrong.

    An untrusted file (or directory) is a ConfigError whose `refusal` says which and why.
    """
    return parse_text(_read(Path(path)), Path(path))


def _read(path: Path) -> bytes:
    # Whoever may write the directory may replace or remove the file in it.
    try:
        fileio.check_path(
            path.parent, f"config directory {path.parent}", fileio.DIRECTORY, fileio.FOLLOW
        )
        return fileio.read_file(path, MAX_CONFIG_BYTES, f"config {path}")
    except fileio.UntrustedFileError as exc:
        raise ConfigError(str(exc), refusal=exc) from None


def log_settings(path: str | Path) -> tuple[Path, str] | None:
    """`syslog_socket` and `syslog_facility` of a trusted config that fails to load otherwise
    (a typo elsewhere), so the handler's line about it goes where the operator reads; None when
    the file is not trusted, not TOML, or these two are not valid themselves."""
    try:
        data = tomllib.loads(_read(Path(path)).decode("utf-8"))
        socket_path = abs_path(data.get("syslog_socket", str(DEFAULT_SYSLOG_SOCKET)), "")
        facility = choice(tuple(FACILITIES))(data.get("syslog_facility", "authpriv"), "")
    except (OSError, ValueError, ConfigError):
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
    values: dict[str, Any] = {}
    obsolete = []
    for key, value in data.items():
        if key in OBSOLETE:
            allowed, advice = OBSOLETE[key]
            if value not in allowed:
                raise ConfigError(f"{where}: {key} is obsolete: {advice}", key=key)
            obsolete.append(key)
            continue
        if key not in _KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}", key=key)
        field_name, check = _KEYS[key]
        if field_name in values:
            raise ConfigError(f"{where}: set region or regions, not both", key=key)
        try:
            values[field_name] = check(value, f"{where}: {key}")
        except ConfigError as exc:
            exc.key = key
            raise
    config = Config(path=path, obsolete=tuple(obsolete), **values)
    _check(config, where)
    return config


def _check(config: Config, where: str) -> None:
    """The rules that tie settings together, within a component and across them."""
    config.check_kms(where)
    config.check_stored(where)
    config.check_token(where, config.seal)
    config.check_sm(where, config.regions)
    config.check_ssm(where, config.regions)
    if config.discovery and not config.region_list:
        raise ConfigError(f"{where}: discovery needs region (or regions)")
    for arn in config.key_arns:
        region = arn.split(":")[3]
        if config.region_list and region not in config.region_list:
            raise ConfigError(f"{where}: key_arns: {arn} is in {region}, not in regions")
    # Each backend is picked by its prefix: two backends on one prefix would be ambiguous.
    seen: dict[str, str] = {}
    for setting in _PREFIX_SETTINGS:
        value = getattr(config, setting)
        if value in seen:
            raise ConfigError(f"{where}: {setting} must differ from {seen[value]} ({value!r})")
        seen[value] = setting
