"""The request-key rule kmskeys installs: one grammar, written and read here, one macro list.

`kmskeys-resolver install` writes the line (resolver/install.py), `kmskeys doctor` reads it back
to learn which resolver and config a miss really uses, and the client reads it when a request
failed before any resolver answered (kmskeys/cached.py). The handler's argv is what these
macros expand to (resolver/handler.py parses it).

request-key.conf(5): `OP TYPE DESCRIPTION CALLOUT-INFO PROGRAM ARG...`, fields separated by
whitespace, no quoting, the first matching line of the files in /etc/request-key.d wins.
Stdlib only; not on the client's import path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kmskeys.contract import DEFAULT_CONFIG, GATE_PROGRAM, REQUEST_KEY_D, rule_file_name

# The request-key macros the handler gets, in this order: key, description, uid, gid and the
# requester's thread, process and session keyrings. The callout (%c) is not among them: it
# would show in the handler's argv (/proc/PID/cmdline) to every local user; the handler reads it
# from the request's authorization key instead.
HANDLER_MACROS = ("%k", "%d", "%u", "%g", "%T", "%P", "%S")
# kmskeys-gate (resolver/gate.c) takes its settings, then these, then `--` and the handler line.
GATE_MACROS = ("%k", "%u")
GATE_END = "--"
HANDLE = "handle"
CONFIG_OPTION = "--config"


class RuleError(ValueError):
    """A rule line cannot be written as asked; the message names the field at fault."""


@dataclass(frozen=True)
class Rule:
    """A `create user PREFIX:* *` line: what it runs, with which config; and where it was read."""

    prefix: str
    program: Path  # the handler (kmskeys-resolver), after the gate's `--` when there is one
    args: tuple[str, ...]  # the handler's arguments: `handle --config PATH %k %d ...`
    config: Path
    gate: Path | None = None
    gate_settings: tuple[str, ...] | None = None
    path: Path | None = None  # the file it was read from

    @property
    def state_dir(self) -> Path | None:
        """The state_dir the gate is given (its first setting), if the rule runs the gate."""
        if self.gate is None or not self.gate_settings:
            return None
        return Path(self.gate_settings[0])

    @property
    def current(self) -> bool:
        """Written the way install writes it today (older installs also passed %c)."""
        return self.args[:1] == (HANDLE,) and self.args[3:] == HANDLER_MACROS


def _checked_path(what: str, path: Path | str) -> str:
    text = str(path)
    # request-key splits its program line on whitespace and has no quoting.
    if any(ch.isspace() for ch in text) or not os.path.isabs(text):
        raise RuleError(f"{what} path {text!r} must be absolute and without spaces")
    return text


def format_rule(
    prefix: str,
    program: Path,
    config: Path,
    gate: Path | None = None,
    gate_settings: Sequence[str] = (),
) -> str:
    """The line that routes `PREFIX:*` requests to `program handle --config CONFIG`, through
    kmskeys-gate with `gate_settings` when `gate` is given."""
    words = ["create", "user", f"{prefix}:*", "*"]
    if gate is not None:
        settings = [str(s) for s in gate_settings]
        if any(not s or any(ch.isspace() for ch in s) for s in settings):
            raise RuleError(f"gate settings {settings!r} must be non-empty and without spaces")
        words += [_checked_path("gate", gate), *settings, *GATE_MACROS, GATE_END]
    words += [_checked_path("resolver", program), HANDLE, CONFIG_OPTION]
    words += [_checked_path("config", config), *HANDLER_MACROS]
    return " ".join(words)


def parse_rule(line: str, prefix: str, path: Path | None = None) -> Rule | None:
    """The rule a `create user PREFIX:* * ...` line states; None for any other line."""
    words = line.split()
    if words[:4] != ["create", "user", f"{prefix}:*", "*"] or len(words) < 5:
        return None
    program, args = Path(words[4]), words[5:]
    gate = settings = None
    if program.name == GATE_PROGRAM and GATE_END in args:
        end = args.index(GATE_END)
        head = args[:end]
        gate = program
        settings = tuple(head[: len(head) - len(GATE_MACROS)])
        if len(args) > end + 1:
            program, args = Path(args[end + 1]), args[end + 2 :]
        else:
            args = []
    config = Path(DEFAULT_CONFIG)
    if args[:2] == [HANDLE, CONFIG_OPTION] and len(args) > 2:
        config = Path(args[2])
    return Rule(prefix, program, tuple(args), config, gate, settings, path)


def find_rule(text: str, prefix: str, path: Path | None = None) -> Rule | None:
    """The first rule for `PREFIX:*` in a request-key.conf file's text."""
    for line in text.splitlines():
        rule = parse_rule(line, prefix, path)
        if rule is not None:
            return rule
    return None


def read_rule(path: Path, prefix: str) -> Rule | None:
    """The first rule for `PREFIX:*` in the file `path` (OSError, UnicodeDecodeError pass)."""
    return find_rule(path.read_text(), prefix, path)


def rule_file(prefix: str, request_key_d: Path = Path(REQUEST_KEY_D)) -> Path:
    """The file routing PREFIX: install's name for it, or another file of the directory with a
    rule for the prefix (`install --rules both` puts the stored prefix's rule in the kms
    prefix's file); install's name when none has one."""
    path = request_key_d / rule_file_name(prefix)
    if path.exists():
        return path
    for other in sorted(request_key_d.glob("*.conf")):
        try:
            if read_rule(other, prefix) is not None:
                return other
        except (OSError, UnicodeDecodeError):
            continue
    return path


def rules_in(text: str, path: Path | None = None) -> list[Rule]:
    """Every `create user PREFIX:* *` rule of a request-key.conf file's text, whatever PREFIX."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) > 4 and words[:2] == ["create", "user"] and words[2].endswith(":*"):
            rule = parse_rule(line, words[2][:-2], path)
            if rule is not None:
                found.append(rule)
    return found


def installed_rules(request_key_d: Path = Path(REQUEST_KEY_D)) -> list[Rule]:
    """Every rule of every file in request_key_d that runs kmskeys (its gate or its resolver);
    unreadable files are skipped."""
    found = []
    for path in sorted(request_key_d.glob("*.conf")):
        try:
            rules = rules_in(path.read_text(), path)
        except (OSError, UnicodeDecodeError):
            continue
        found += [r for r in rules if r.gate is not None or r.args[:1] == (HANDLE,)]
    return found
