"""What an install claims on the host, recorded, and a second install that would share it refused.

Two installs on one host (`--config other.toml --prefix other`) must not share a routed prefix
(request-key runs the first matching rule: the other install never sees its requests), a
state_dir (the per-uid slots, host-cache locks, refresh records and flush epoch of one install
would count and flush the other's), a keystore_dir (two resolvers writing one keystore under
different policies) or a warm_socket. install records what it claims (kmskeys/rules.py
InstallRecord) in the rule file and in the state_dir; before it writes anything, it reads the
other installs' records from /etc/request-key.d (or, for an install from before records, their
rules and config) and refuses a clash, naming the setting and what to set (docs/resolver.md,
"Two installs on one host").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

from kmskeys import fileio
from kmskeys.rules import RECORD_FILE, InstallRecord, parse_record, rules_in
from resolver import config as config_mod
from resolver.errors import ConfigError, InstallError
from resolver.registry import SHIPPED


def make_record(
    config: config_mod.Config, rules: str, routed: list[str], resolver: Path
) -> InstallRecord:
    """The record of the install of `config` with `--rules rules`, routing `routed`."""
    stored = config.stored_prefix in routed
    return InstallRecord(
        prefix=config.prefix,
        config=str(config.path),
        rules=rules,
        routed=tuple(routed),
        stored_prefix=config.stored_prefix,
        state_dir=str(config.state_dir),
        keystore_dir=str(config.keystore_dir) if stored else None,
        warm_socket=None if config.warm_socket is None else str(config.warm_socket),
        resolver=str(resolver),
        python=os.path.abspath(sys.executable),
    )


def check_clashes(
    record: InstallRecord, target: Path, request_key_d: Path, new_config: bool = False
) -> None:
    """InstallError naming each thing `record` would share with another install, and what to
    set instead; nothing when it shares none. The install in `target`, the rule file this one
    (re)writes, is the one being replaced (`install --config OTHER` points the rule at an
    existing OTHER); never by a config this very install creates (a forgotten --prefix)."""
    problems = list(_clashes(record, target, request_key_d))
    replaced = _record_of(target)
    taken = replaced is not None and replaced.config != record.config
    if new_config and taken and replaced is not None and Path(replaced.config).exists():
        problems.insert(
            0,
            f"prefix {record.prefix!r} is installed with config {replaced.config} "
            f"({target}): give {record.config} a prefix of its own (--prefix P)",
        )
    if problems:
        raise InstallError(
            "another install on this host claims what this one would use:\n  "
            + "\n  ".join(problems)
            + '\n(docs/resolver.md, "Two installs on one host")'
        )


def _record_of(path: Path) -> InstallRecord | None:
    try:
        return parse_record(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None


def _setting_of(config: config_mod.Config, prefix: str) -> str:
    for spec, _ in SHIPPED:
        if getattr(config, spec.prefix_setting) == prefix:
            return spec.prefix_setting
    return "prefix"


def _clashes(record: InstallRecord, target: Path, request_key_d: Path) -> Iterator[str]:
    config = config_mod.load(Path(record.config))
    ours = record.config
    for path, other in _others(request_key_d):
        if other.config == ours or path == target:
            continue  # the same install, its rules in another file
        where = f"{path} (config {other.config})"
        for prefix in sorted(set(record.routed) & set(other.routed)):
            setting = _setting_of(config, prefix)
            yield (
                f"{setting} {prefix!r} is routed by {where}: set {setting} in {ours} to a "
                "prefix of this install's own"
            )
        if not Path(other.config).exists():
            continue  # a rule whose config is gone uses nothing else
        same = [
            ("state_dir", record.state_dir, other.state_dir, f"/run/kmskeys-{record.prefix}"),
            (
                "keystore_dir",
                record.keystore_dir,
                other.keystore_dir,
                f"/var/lib/kmskeys-{record.prefix}",
            ),
            (
                "warm_socket",
                record.warm_socket,
                other.warm_socket,
                f"/run/kmskeys-{record.prefix}.sock",
            ),
        ]
        for setting, mine, theirs, example in same:
            if mine is not None and mine == theirs:
                yield (
                    f"{setting} {mine} is the one of {where}: set {setting} in {ours} to one "
                    f'of this install\'s own, e.g. {setting} = "{example}"'
                )


def _others(request_key_d: Path) -> Iterator[tuple[Path, InstallRecord]]:
    """Each rule file of the directory, as a record (made from its rules and config for an
    install from before records)."""
    for path in sorted(request_key_d.glob("*.conf")):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        record = parse_record(text) or _guessed(text, path)
        if record is not None:
            yield path, record


def _guessed(text: str, path: Path) -> InstallRecord | None:
    """What an older install's rules claim: their prefixes and the gate's state_dir, and from
    its config (when it loads) the keystore and warm socket."""
    rules = rules_in(text, path)
    if not rules:
        return None
    first = rules[0]
    state_dir = str(first.state_dir) if first.state_dir is not None else None
    keystore = warm = None
    try:
        config = config_mod.load(first.config)
        state_dir = str(config.state_dir)
        routed = {r.prefix for r in rules}
        keystore = str(config.keystore_dir) if config.stored_prefix in routed else None
        warm = None if config.warm_socket is None else str(config.warm_socket)
    except ConfigError:
        pass
    return InstallRecord(
        prefix=first.prefix,
        config=str(first.config),
        rules="",
        routed=tuple(r.prefix for r in rules),
        stored_prefix="",
        state_dir=state_dir or "",
        keystore_dir=keystore,
        warm_socket=warm,
        resolver=str(first.program),
        python="",
    )


def ensure_state_dir(record: InstallRecord) -> bool:
    """Make the install's state_dir (root-only) if missing; True if this created it."""
    state_dir = Path(record.state_dir)
    created = not state_dir.exists()
    os.close(fileio.open_dir(state_dir, f"state_dir {state_dir}", fileio.CREATE | fileio.PRIVATE))
    return created


def write_state_record(record: InstallRecord, manifest: list[str]) -> None:
    """Keep the record, with install's manifest lines, in the install's state_dir too: doctor
    reads it when the rule is gone, and install then writes the rule file as it was."""
    text = "\n".join([record.line(), *manifest, ""])
    fileio.write_atomic(Path(record.state_dir) / RECORD_FILE, text.encode(), 0o600)


def kept_record(state_dir: Path, config: Path) -> str | None:
    """The state_dir's record text, if it is the install of `config`'s."""
    try:
        text = fileio.read_file(state_dir / RECORD_FILE, 1 << 16, "install record").decode()
    except (fileio.UntrustedFileError, OSError, UnicodeDecodeError):
        return None
    record = parse_record(text)
    return text if record is not None and record.config == str(config) else None


def remove_state_record(text: str) -> str | None:
    """Remove the state_dir record of the install whose rule file text is `text`; what was
    removed, if anything."""
    record = parse_record(text)
    if record is None:
        return None
    path = Path(record.state_dir) / RECORD_FILE
    try:
        kept = parse_record(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None
    if kept is None or kept.config != record.config:
        return None
    path.unlink()
    return str(path)
