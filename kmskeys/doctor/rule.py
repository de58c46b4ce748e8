"""Which rule routes PREFIX:* requests, which resolver it runs, with which config and gate."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from kmskeys import contract
from kmskeys.checkreport import ConfigLoaded
from kmskeys.doctor.finding import FAIL, OK, WARN, Finding, q
from kmskeys.doctor.fixes import install_fix, new_rule_fix, suggested_config
from kmskeys.rules import Rule, read_rule, rule_file
from kmskeys.trust import unsafe_reason

REQUEST_KEY_D = Path(contract.REQUEST_KEY_D)


def check_rule(prefix: str, asked: Path | None) -> tuple[list[Finding], Rule | None]:
    """Which rule routes PREFIX:* requests, which resolver it runs and which config it names."""
    path = rule_file(prefix, REQUEST_KEY_D)
    config = asked or suggested_config(prefix)
    try:
        st = path.lstat()
        rule = read_rule(path, prefix)
    except FileNotFoundError:
        others = sorted(p.name for p in REQUEST_KEY_D.glob("kmskeys*.conf"))
        seen = f" (installed here: {', '.join(others)})" if others else ""
        return [
            Finding(
                FAIL,
                "rule",
                f"no rule {path}: requests for {prefix}:NAME never reach a resolver and fail "
                f"with ENOKEY, logged nowhere{seen}; if the app should use another prefix, give "
                "it that one (get_secret(..., prefix=P), kmskeys get --prefix P)",
                new_rule_fix(asked, prefix),
            )
        ], None
    except (OSError, UnicodeDecodeError) as exc:
        return [
            Finding(FAIL, "rule", f"cannot read {path} ({exc})", install_fix(config, prefix))
        ], None
    findings = []
    reason = unsafe_reason(st)
    if reason or stat.S_ISLNK(st.st_mode):
        findings.append(
            Finding(
                FAIL,
                "rule",
                f"{path} is {reason or 'a symbolic link'}: whoever can change it runs programs "
                "as root",
                f"chown root:root {q(path)} && chmod 644 {q(path)}",
            )
        )
    if rule is None:
        findings.append(
            Finding(FAIL, "rule", f"{path} has no rule for {prefix}:*", new_rule_fix(asked, prefix))
        )
        return findings, None
    if asked is not None and Path(os.path.abspath(asked)) != rule.config:
        findings.append(
            Finding(
                FAIL,
                "rule",
                f"the rule {path} names config {rule.config}, not {asked}: misses use "
                f"{rule.config}",
                install_fix(asked, prefix),
            )
        )
        return findings, rule
    if not os.access(rule.program, os.X_OK):
        findings.append(
            Finding(
                FAIL,
                "rule",
                f"{path} runs {rule.program}, which is missing: every miss fails with ENOKEY",
                install_fix(rule.config, prefix),
            )
        )
        return findings, rule
    if not rule.current:
        findings.append(
            Finding(
                WARN,
                "rule",
                f"{path} was written by an older install ({' '.join(rule.args[3:])}); a rule "
                "passing %c puts every inline blob in argv",
                install_fix(rule.config, prefix),
            )
        )
        return findings, rule
    findings.append(
        Finding(OK, "rule", f"rule {path} runs {rule.program} with config {rule.config}")
    )
    return findings, rule


def check_gate(config: ConfigLoaded, rule: Rule | None, prefix: str) -> Iterator[Finding]:
    """The gate on the rule line has the config's limits (install copies them there)."""
    wanted = tuple(config["gate_settings"])
    if rule is None:
        return
    if rule.gate is None:
        yield Finding(
            WARN,
            "rule",
            f"{rule.path} runs the handler without kmskeys-gate: one uid's flood of misses "
            "starts a Python process each (docs/resolver.md)",
            install_fix(rule.config, prefix),
        )
    elif rule.gate_settings != wanted:
        yield Finding(
            WARN,
            "rule",
            f"{rule.path} gives kmskeys-gate {' '.join(rule.gate_settings or [])}, the config "
            f"says {' '.join(wanted)} (state_dir, max_concurrent_per_uid, negative_ttl, "
            "syslog, warm_socket, daemon_wait, aggregate_subuids): install copies them into "
            "the rule",
            install_fix(rule.config, prefix),
        )
