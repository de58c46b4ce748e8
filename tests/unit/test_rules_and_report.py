"""The contracts that cross a process boundary live on one side (issue 22.4): the request-key
rule grammar (kmskeys/rules.py), written by install and read by doctor and the client, and the
declared shape of `kmskeys-resolver check`'s report (kmskeys/checkreport.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmskeys.checkreport import loaded_config, parse_report, refused_config
from kmskeys.rules import (
    HANDLER_MACROS,
    RuleError,
    find_rule,
    format_rule,
    parse_rule,
)
from resolver import selfcheck
from resolver.handler import parse_args

pytestmark = pytest.mark.unit

GATE = Path("/opt/kmskeys/lib/resolver/kmskeys-gate")
RESOLVER = Path("/opt/kmskeys/bin/kmskeys-resolver")
CONFIG = Path("/etc/kmskeys/app/resolver.toml")
SETTINGS = ("/var/lib/kmskeys/state", "4", "10", "/dev/log", "80")


def test_the_line_install_writes_is_the_rule_doctor_reads() -> None:
    line = format_rule("app", RESOLVER, CONFIG, GATE, SETTINGS)
    rule = parse_rule(line, "app")
    assert rule is not None
    assert (rule.program, rule.config, rule.gate) == (RESOLVER, CONFIG, GATE)
    assert rule.gate_settings == SETTINGS
    assert rule.current
    assert rule.args == ("handle", "--config", str(CONFIG), *HANDLER_MACROS)
    assert parse_rule(line, "kms") is None  # another prefix's line
    # Without the gate, and inside a file with comments and other rules.
    bare = format_rule("app", RESOLVER, CONFIG)
    text = f"# kmskeys-resolver install\ncreate user other:* * /bin/true\n{bare}\n"
    found = find_rule(text, "app")
    assert found is not None and found.gate is None and found.current


def test_the_handler_parses_what_the_macros_expand_to() -> None:
    # request-key substitutes each macro with one word: the handler's argv after `handle`.
    expanded = {"%k": "12", "%d": "app:x", "%u": "1000", "%g": "1000", "%T": "0", "%P": "0"}
    expanded["%S"] = "7"
    rule = parse_rule(format_rule("app", RESOLVER, CONFIG), "app")
    assert rule is not None
    argv = [expanded.get(word, word) for word in rule.args[1:]]
    args = parse_args(argv)
    assert (args.config, args.key, args.description, args.uid) == (CONFIG, 12, "app:x", 1000)


def test_an_older_rule_is_not_current() -> None:
    old = f"create user kms:* * {RESOLVER} handle --config {CONFIG} %k %d %c %u %g %T %P %S"
    rule = parse_rule(old, "kms")
    assert rule is not None and not rule.current


@pytest.mark.parametrize(
    "bad", [Path("relative/resolver"), Path("/with space/resolver"), Path("/a\tb")]
)
def test_a_path_request_key_would_split_is_refused(bad: Path) -> None:
    with pytest.raises(RuleError):
        format_rule("app", bad, CONFIG)
    with pytest.raises(RuleError):
        format_rule("app", RESOLVER, CONFIG, GATE, ("/state dir", "4"))


def test_the_resolvers_report_has_the_declared_shape(tmp_path: Path) -> None:
    missing = selfcheck.report(tmp_path / "absent" / "resolver.toml")
    decoded = json.loads(json.dumps(missing))  # as doctor receives it
    report = parse_report(decoded)
    assert report is not None
    refused = refused_config(report)
    assert refused is not None and refused["problem"] == "missing"
    assert loaded_config(report) is None


@pytest.mark.parametrize(
    "value",
    [
        [],
        {"config_path": "/x"},
        {"config_path": "/x", "resolver": "r", "python": "p", "config": {}, "known_keys": []},
        {
            "config_path": "/x",
            "resolver": "r",
            "python": "p",
            "config": {"ok": True, "prefix": "kms"},  # most settings missing
            "known_keys": [],
        },
    ],
)
def test_a_report_of_another_shape_is_refused(value: object) -> None:
    assert parse_report(value) is None
