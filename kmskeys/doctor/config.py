"""The config as the resolver loads it, and a paste-able edit when the resolver refuses it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from kmskeys.checkreport import CheckReport, ConfigLoaded, loaded_config, refused_config
from kmskeys.doctor.finding import FAIL, INFO, OK, Finding, q
from kmskeys.doctor.fixes import install_fix


def _toml_line(config: Path, key: str) -> str | None:
    """The config's one line setting top-level `key`, when it holds the whole value."""
    try:
        lines = config.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        head = line.split("=", 1)[0].strip()
        if head == key and "=" in line:
            value = line.split("=", 1)[1]
            balanced = value.count("[") == value.count("]") and value.count("{") == value.count("}")
            return line if balanced and '"""' not in value and "'''" not in value else None
        if line.lstrip().startswith("["):
            break  # top-level keys come before the first table
    return None


def _config_fix(config: Path, key: str | None, known: Sequence[str]) -> str:
    """A paste-able edit for an invalid config: rename a misspelt key or comment out a bad one
    (its default then applies); otherwise open the file in an editor."""
    editor = f"${{EDITOR:-vi}} {q(config)}"
    if key is None or _toml_line(config, key) is None:
        return editor
    import difflib

    pattern = f"^[[:space:]]*{key}[[:space:]]*="
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        # Renaming onto a key the file already sets would make it a duplicate: comment out.
        if close and _toml_line(config, close[0]) is None:
            rename = f"s/^\\([[:space:]]*\\){key}\\([[:space:]]*=\\)/\\1{close[0]}\\2/"
            return f"sed -i '{rename}' {q(config)}"
    return f"sed -i 's/{pattern}/# &/' {q(config)}"


def check_config(report: CheckReport, prefix: str, routed: bool = True) -> Iterator[Finding]:
    """The config as the resolver loads it; `routed`: a rule for PREFIX names it."""
    config = Path(report["config_path"])
    loaded = loaded_config(report)
    if loaded is not None:
        yield from _served(loaded, config, prefix, routed)
        return
    refused = refused_config(report)
    assert refused is not None
    where = Path(refused["path"] or config)
    problem = refused["problem"]
    if problem == "missing":
        yield Finding(
            FAIL,
            "config",
            f"config {config} missing ({refused['error']}): every request is refused",
            install_fix(config, prefix),
        )
    elif problem == "unsafe":
        mode = "755" if where != config else "644"
        yield Finding(
            FAIL,
            "config",
            f"config {config}: {refused['error']}: every request is refused",
            f"chown root:root {q(where)} && chmod {mode} {q(where)}",
        )
    elif problem == "unreadable" and os.geteuid() != 0:
        yield Finding(
            INFO, "config", f"config {config} is not readable by this user; run doctor as root"
        )
    else:
        yield Finding(
            FAIL,
            "config",
            f"the resolver refuses its config: {refused['error']}: every request is refused "
            "(docs/resolver.md lists every key)",
            _config_fix(config, refused["key"], report["known_keys"]),
        )


def _served(found: ConfigLoaded, config: Path, prefix: str, routed: bool) -> Iterator[Finding]:
    """A config the resolver loads: does it serve PREFIX?"""
    if not routed and prefix not in (found["prefix"], found["stored_prefix"]):
        yield Finding(
            INFO,
            "config",
            f"config {config} serves prefix {found['prefix']!r}, not {prefix!r}: a rule "
            f"for {prefix} needs a config of its own (the rule finding's fix makes one)",
        )
        return
    if prefix not in (found["prefix"], found["stored_prefix"]):
        yield Finding(
            FAIL,
            "config",
            f"config {config} serves prefix {found['prefix']!r}, but the rule routes "
            f"{prefix}:* to it: every request is refused",
            f"sed -i 's/^[[:space:]]*prefix[[:space:]]*=.*/prefix = \"{prefix}\"/' {q(config)}",
        )
        return
    yield Finding(
        OK, "config", f"config {config} is root-owned and safe, and the resolver loads it"
    )
