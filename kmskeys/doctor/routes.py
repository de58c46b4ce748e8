"""The install's other prefixes: every prefix it routes has its rule, running the same resolver
with the same config (`--rules both` routes kms: and stored: from one rule file)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from kmskeys.doctor.finding import FAIL, OK, Finding
from kmskeys.doctor.fixes import REQUEST_KEY_D, recorded
from kmskeys.rules import Rule, installed_rules, read_rule, rule_file


def check_routes(prefix: str, rule: Rule | None) -> Iterator[Finding]:
    """Each other prefix the install of this rule's config routes (as it recorded): its rule is
    there and runs what this one runs."""
    if rule is None:
        return
    record = recorded(prefix, rule.config)
    if record is None:
        return
    others = [p for p in record.routed if p != prefix]
    for other in others:
        found = _rule_of(other)
        if found is None:
            problem = "no rule routes it: its requests fail with ENOKEY"
        elif (found.program, found.config) != (rule.program, rule.config):
            problem = f"its rule ({found.path}) runs {found.program} with config {found.config}"
        else:
            continue
        yield Finding(
            FAIL,
            "routes",
            f"the install of {record.config} routes {other}:* too (--rules {record.rules}), "
            f"but {problem}",
            record.install_command(),
        )
        return
    if others:
        yield Finding(OK, "routes", f"the install's other prefixes are routed: {', '.join(others)}")


def _rule_of(prefix: str) -> Rule | None:
    path = rule_file(prefix, REQUEST_KEY_D)
    try:
        return read_rule(path, prefix)
    except (OSError, UnicodeDecodeError):
        return None


def routed_prefixes(config: Path) -> set[str]:
    """The prefixes the rules of /etc/request-key.d route to a resolver with `config`."""
    wanted = os.path.abspath(config)
    return {r.prefix for r in installed_rules(REQUEST_KEY_D) if str(r.config) == wanted}
