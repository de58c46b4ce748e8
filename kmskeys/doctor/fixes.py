"""How a fix names the root side's resolver and the install command that routes a prefix.

A fix re-runs the install as it was made: install recorded its options (`--config`,
`--prefix`, `--rules`), the prefixes it routes, the `kmskeys-resolver` it installed and that
program's interpreter (kmskeys/rules.py InstallRecord) in the rule file and in its state_dir.
doctor may run from an app's environment that lacks the resolver, or has another one: its own
interpreter is named only when no install of this host recorded itself.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from kmskeys import contract, fileio
from kmskeys.contract import DEFAULT_PREFIX
from kmskeys.doctor.finding import q
from kmskeys.rules import RECORD_FILE, InstallRecord, parse_record

DEFAULT_CONFIG = Path(contract.DEFAULT_CONFIG)
REQUEST_KEY_D = Path(contract.REQUEST_KEY_D)
_RECORD_LIMIT = 1 << 16


def own_resolver() -> Path | None:
    """The kmskeys-resolver of this installation (next to this interpreter), or on PATH."""
    sibling = Path(sys.executable).parent / "kmskeys-resolver"
    if os.access(sibling, os.X_OK):
        return sibling
    found = shutil.which("kmskeys-resolver")
    return Path(found) if found else None


def _trusted_text(path: Path) -> str | None:
    """A root-owned file's text (a record steers a command root pastes), or None."""
    try:
        return fileio.read_file(path, _RECORD_LIMIT, str(path), fileio.FOLLOW).decode()
    except (fileio.UntrustedFileError, OSError, UnicodeDecodeError):
        return None


def recorded(prefix: str | None, config: Path | None = None) -> InstallRecord | None:
    """The record of the install that routes `prefix` (any prefix when None) with `config`
    (any config when None): from the rule files, else from the state_dir of that config (or of
    the default one) when the rule is gone. None when no install recorded itself so."""
    wanted = None if config is None else os.path.abspath(config)

    def fits(record: InstallRecord | None) -> bool:
        return (
            record is not None
            and (prefix is None or prefix in record.routed)
            and (wanted is None or record.config == wanted)
        )

    for path in sorted(REQUEST_KEY_D.glob("*.conf")):
        text = _trusted_text(path)
        record = parse_record(text) if text is not None else None
        if fits(record):
            return record
    state_dir = config_setting(config or DEFAULT_CONFIG, "state_dir", contract.DEFAULT_STATE_DIR)
    text = _trusted_text(Path(state_dir) / RECORD_FILE)
    record = parse_record(text) if text is not None else None
    return record if fits(record) else None


def resolver_command(config: Path | None = None) -> str:
    """How a fix names kmskeys-resolver: the one the install of `config` recorded, else this
    installation's, by absolute path."""
    record = recorded(None, config)
    if record is not None:
        return q(record.resolver)
    found = own_resolver()
    return q(found) if found else "kmskeys-resolver"


def pip_fix(config: Path | None = None) -> str:
    """The pip line that gives the root side's interpreter the resolver's dependencies."""
    record = recorded(None, config)
    python = record.python if record is not None else sys.executable
    return f"{q(python)} -m pip install 'kmskeys[resolver]'"


def install_fix(config: Path, prefix: str) -> str:
    """The install command that (re)writes the rule for `prefix` naming `config`: the install
    as recorded (its options, its resolver) when one routes `prefix` with that config."""
    record = recorded(prefix, config)
    if record is not None:
        return record.install_command()
    config_of = config_setting(config, "prefix", DEFAULT_PREFIX)
    stored = config_setting(config, "stored_prefix", contract.DEFAULT_STORED_PREFIX)
    if prefix == stored and prefix != config_of:
        # The stored: prefix is routed by its config's install (install refuses --prefix of
        # the stored prefix); --rules both keeps the kms prefix routed as well.
        words = f"install --config {q(config)} --prefix {q(config_of)} --rules both"
        return f"{resolver_command(config)} {words}"
    return f"{resolver_command(config)} install --config {q(config)} --prefix {q(prefix)}"


def config_setting(path: Path, key: str, default: str) -> str:
    """A top-level string setting of a config file (plain TOML reading, for suggestions only:
    the resolver's own check judges the file), `default` when it is not set; "" when the file
    is missing or unreadable."""
    import tomllib

    try:
        value = tomllib.loads(path.read_text()).get(key, default)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    return value if isinstance(value, str) else ""


def config_prefix(path: Path) -> str | None:
    """The prefix a config file serves; None when it is missing or unreadable."""
    return config_setting(path, "prefix", DEFAULT_PREFIX) or None


def suggested_config(prefix: str) -> Path:
    """Where a new install for `prefix` should put its config: the config a recorded install
    routing `prefix` uses; else the default config, unless that one serves another prefix;
    then a config of the prefix's own, next to it."""
    record = recorded(prefix)
    if record is not None:
        return Path(record.config)
    if config_prefix(DEFAULT_CONFIG) in (None, prefix):
        return DEFAULT_CONFIG
    return DEFAULT_CONFIG.parent / prefix / "resolver.toml"


def new_rule_fix(asked: Path | None, prefix: str) -> str:
    """The install that adds a rule for `prefix`: with the config asked about, unless that one
    serves another prefix and not as its stored prefix (install would refuse it)."""
    if asked is not None:
        stored = config_setting(asked, "stored_prefix", contract.DEFAULT_STORED_PREFIX)
        if config_prefix(asked) in (None, prefix) or stored == prefix:
            return install_fix(asked, prefix)
    return install_fix(suggested_config(prefix), prefix)
