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
# kmskeys-gate (resolver/gate.c) takes its settings, then these, then `--` and the handler line:
# the key and uid, and the requester's thread, process and session keyrings, which it hands on
# to the resolver daemon (the identification's, issue 24). A rule written before the daemon
# passed `%k %u` alone; the gate and parse_rule take both.
GATE_MACROS = ("%k", "%u", "%T", "%P", "%S")
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
        # The settings never start with `%` (paths, numbers, `-`); the macros all do.
        settings = tuple(word for word in head if not word.startswith("%"))
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


# install records what it was asked and what it claims in the rule file (one comment line,
# which request-key ignores) and in the install's state_dir: doctor's fixes re-run exactly that
# install (kmskeys/doctor/fixes.py), and a second install refuses to share what this one claims
# (resolver/installclash.py).
RECORD_LINE = "# kmskeys-install: "
RECORD_FILE = "install-record"


@dataclass(frozen=True)
class InstallRecord:
    """One install as `kmskeys-resolver install` made it: its options (`rules`, `config`,
    `prefix`), the prefixes its rules route, what it claims on the host, and the root side's
    own programs (the resolver it installed, that resolver's interpreter)."""

    prefix: str
    config: str
    rules: str
    routed: tuple[str, ...]
    stored_prefix: str
    state_dir: str
    keystore_dir: str | None  # when the rules route stored:
    warm_socket: str | None
    resolver: str
    python: str

    def line(self) -> str:
        """The record as its rule-file comment line."""
        import json

        fields = {**self.__dict__, "routed": list(self.routed)}
        return RECORD_LINE + json.dumps(fields, sort_keys=True)

    def install_command(self) -> str:
        """The command that makes this install again, as its root side runs it."""
        import shlex

        words = [self.resolver, "install", "--config", self.config, "--prefix", self.prefix]
        return shlex.join([*words, "--rules", self.rules])


def parse_record(text: str) -> InstallRecord | None:
    """The install record in a rule file's (or a record file's) text; None when it has none or
    one of another shape."""
    import json

    for line in text.splitlines():
        if not line.startswith(RECORD_LINE):
            continue
        try:
            fields = json.loads(line[len(RECORD_LINE) :])
            record = InstallRecord(**{**fields, "routed": tuple(fields["routed"])})
        except (ValueError, TypeError, KeyError):
            return None
        strings = (record.prefix, record.config, record.rules, record.resolver, record.python)
        return record if all(isinstance(s, str) for s in strings) else None
    return None
