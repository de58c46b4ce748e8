"""The stored: keystore of an install that routes it: the userdel hook that retires a removed
account's keys, and entries left in the flat layout of kmskeys 0.1 (docs/dpapi.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kmskeys.checkreport import ConfigLoaded
from kmskeys.doctor.finding import INFO, OK, WARN, Finding, q
from kmskeys.doctor.fixes import resolver_command

LOGIN_DEFS = Path("/etc/login.defs")
HOOK = Path("/usr/local/sbin/kmskeys-userdel")


def check_stored(
    config: ConfigLoaded, config_path: Path, routed: set[str], login_defs: Path = LOGIN_DEFS
) -> Iterator[Finding]:
    """The userdel hook and the keystore's layout, when a rule routes the stored prefix."""
    if config["stored_prefix"] not in routed:
        return
    yield from _userdel_hook(config_path, login_defs)
    keystore = config.get("keystore")
    if keystore is None or keystore["flat"] is None:
        return
    if keystore["flat"]:
        yield Finding(
            WARN,
            "stored",
            f"keystore {keystore['dir']} holds {keystore['flat']} entries in the flat layout of "
            "kmskeys 0.1: each is moved on its first use, and `stored list` and `retire` see "
            "them only after",
            f"{resolver_command(config_path)} stored --config {q(config_path)} migrate",
        )
    else:
        yield Finding(OK, "stored", f"keystore {keystore['dir']}: one directory per name")


def _userdel_hook(config_path: Path, login_defs: Path) -> Iterator[Finding]:
    command = _userdel_cmd(login_defs)
    if command is not None and _calls_retire(Path(command), config_path):
        yield Finding(OK, "stored", f"userdel runs {command}, which retires a removed user's keys")
        return
    if command is not None:
        # USERDEL_CMD takes one command: the administrator's own script must call ours.
        yield Finding(
            INFO,
            "stored",
            f"USERDEL_CMD in {login_defs} runs {command}, which does not retire the stored: keys "
            f"of {config_path}: call `{resolver_command(config_path)} stored --config "
            f'{config_path} retire --user "$1"` from it (docs/dpapi.md, the userdel hook)',
        )
        return
    # A finding to act on, not a fix to paste: /etc/login.defs is the host's (userdel reads
    # it for every account), and USERDEL_CMD takes one command the administrator may own.
    resolver = resolver_command(config_path)
    yield Finding(
        INFO,
        "stored",
        f"no userdel hook in {login_defs}: a removed account's stored: keys stay until `stored "
        "retire`, and a new account given its uid is refused them; enable it with "
        f"`{resolver} stored --config {q(config_path)} userdel-hook --write {HOOK}` and "
        f"`USERDEL_CMD {HOOK}` in {login_defs} (docs/dpapi.md, the userdel hook)",
    )


def _userdel_cmd(login_defs: Path) -> str | None:
    try:
        lines = login_defs.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    found = None
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "USERDEL_CMD":
            found = words[1]  # login.defs: the last setting wins
    return found


def _calls_retire(script: Path, config_path: Path) -> bool:
    try:
        text = script.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return f"stored --config {q(config_path)} retire --user" in text
