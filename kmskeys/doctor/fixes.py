"""How a fix names this installation's resolver and the install command that routes a prefix."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from kmskeys import contract
from kmskeys.contract import DEFAULT_PREFIX
from kmskeys.doctor.finding import q

DEFAULT_CONFIG = Path(contract.DEFAULT_CONFIG)


def own_resolver() -> Path | None:
    """The kmskeys-resolver of this installation (next to this interpreter), or on PATH."""
    sibling = Path(sys.executable).parent / "kmskeys-resolver"
    if os.access(sibling, os.X_OK):
        return sibling
    found = shutil.which("kmskeys-resolver")
    return Path(found) if found else None


def resolver_command() -> str:
    """How a fix names kmskeys-resolver: the absolute path of this installation's, if any."""
    found = own_resolver()
    return q(found) if found else "kmskeys-resolver"


def install_fix(config: Path, prefix: str) -> str:
    """The install command that (re)writes the rule for `prefix` naming `config`."""
    return f"{resolver_command()} install --config {q(config)} --prefix {q(prefix)}"


def config_prefix(path: Path) -> str | None:
    """The prefix a config file serves (plain TOML reading, for suggestions only: the resolver's
    own check judges the file); None when it is missing or unreadable."""
    import tomllib

    try:
        value = tomllib.loads(path.read_text()).get("prefix", DEFAULT_PREFIX)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return value if isinstance(value, str) else None


def suggested_config(prefix: str) -> Path:
    """Where a new install for `prefix` should put its config: the default config, unless that
    one serves another prefix; then a config of the prefix's own, next to it."""
    if config_prefix(DEFAULT_CONFIG) in (None, prefix):
        return DEFAULT_CONFIG
    return DEFAULT_CONFIG.parent / prefix / "resolver.toml"


def new_rule_fix(asked: Path | None, prefix: str) -> str:
    """The install that adds a rule for `prefix`: with the config asked about, unless that one
    serves another prefix (install would refuse it)."""
    if asked is not None and config_prefix(asked) in (None, prefix):
        return install_fix(asked, prefix)
    return install_fix(suggested_config(prefix), prefix)
