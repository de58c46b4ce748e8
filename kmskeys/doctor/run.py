"""`kmskeys doctor`: every check, in the order printed; text or JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kmskeys import imds
from kmskeys.checkreport import CheckReport, loaded_config
from kmskeys.contract import DEFAULT_PREFIX
from kmskeys.doctor.blobs import check_blobs
from kmskeys.doctor.config import check_config
from kmskeys.doctor.daemon import check_daemon_path
from kmskeys.doctor.dependencies import check_dependencies
from kmskeys.doctor.finding import FAIL, INFO, WARN, Finding
from kmskeys.doctor.fixes import install_fix, own_resolver, pip_fix, recorded, suggested_config
from kmskeys.doctor.imds import _probe_as_nobody, imds_findings
from kmskeys.doctor.keyctl import check_keyctl, check_request_key
from kmskeys.doctor.negative import check_negative_keys
from kmskeys.doctor.programs import check_program_host
from kmskeys.doctor.quota import check_quota
from kmskeys.doctor.refresher import check_refresher
from kmskeys.doctor.report import run_check
from kmskeys.doctor.routes import check_routes, routed_prefixes
from kmskeys.doctor.rule import check_gate, check_rule
from kmskeys.doctor.session import check_session_keyring
from kmskeys.doctor.stored import check_stored
from kmskeys.doctor.syslog import check_syslog
from kmskeys.doctor.tools import check_tools
from kmskeys.doctor.upcall import check_upcalls
from kmskeys.rules import Rule


class _Background:
    """Run `work` in a thread now; `result()` waits for it (the IMDS probes wait on timeouts)."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self._value: Any = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], Any]) -> None:
        self._value = work()

    def result(self) -> Any:
        self._thread.join()
        return self._value


def findings(prefix: str, config: Path | None) -> Iterator[Finding]:
    """Every finding for PREFIX, in the order printed."""
    uid = os.getuid()
    imds_mine = _Background(lambda: imds.probe(0.5))
    imds_nobody = _Background(_probe_as_nobody) if os.geteuid() == 0 else None
    keyctl = list(check_keyctl())
    blocked = keyctl[0].level == FAIL
    rule_findings, rule = check_rule(prefix, config)
    config_path = Path(
        os.path.abspath(config or (rule.config if rule else suggested_config(prefix)))
    )
    runnable = rule is not None and os.access(rule.program, os.X_OK)
    # The rule's resolver; with none that runs, the one the install recorded (the root side's
    # own), and only then this environment's.
    record = recorded(prefix, config_path)
    fallback = Path(record.resolver) if record is not None else own_resolver()
    program = rule.program if rule is not None and runnable else fallback
    # The resolver's check (an interpreter start and its imports) runs while the probes do.
    check = _Background(lambda: run_check(program, config_path)) if program else None
    yield from keyctl
    yield from check_request_key()
    yield from rule_findings
    if not blocked:
        yield from check_upcalls()
    if check is None:
        yield Finding(
            WARN,
            "config",
            f"no kmskeys-resolver to check {config_path} with",
            pip_fix(config_path),
        )
    else:
        report = check.result()
        if isinstance(report, str) and os.geteuid() != 0:
            yield Finding(
                INFO,
                "config",
                f"{report}: this user cannot run the resolver's check; run doctor as root",
            )
        elif isinstance(report, str):
            yield Finding(
                FAIL,
                "config",
                f"{report}: it cannot judge its config (an older kmskeys-resolver?)",
                install_fix(config_path, prefix),
            )
        else:
            yield from _verdict(report, rule, prefix)
    if not blocked:
        yield from check_session_keyring(uid)
        yield from check_negative_keys(prefix)
    yield from check_quota(uid)
    yield from imds_findings(uid, imds_mine.result(), imds_nobody.result() if imds_nobody else None)


def _verdict(report: CheckReport, rule: Rule | None, prefix: str) -> Iterator[Finding]:
    """The findings drawn from the resolver's own report."""
    yield from check_config(report, prefix, routed=rule is not None)
    yield from check_routes(prefix, rule)
    yield from check_dependencies(report, prefix)
    config = loaded_config(report)
    if config is not None:
        path = Path(report["config_path"])
        yield from check_gate(config, rule, prefix)
        yield from check_blobs(report, config)
        yield from check_syslog(config, path)
        yield from check_daemon_path(config, path, rule, prefix)
        routed = routed_prefixes(path)
        yield from check_program_host(config)
        yield from check_stored(config, path, routed)
        yield from check_tools(config, path, routed)
        yield from check_refresher(config, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every check; exit 1 if any finding is a failure."""
    from kmskeys import doctor

    parser = argparse.ArgumentParser(prog="kmskeys doctor", description=doctor.__doc__)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="description namespace")
    parser.add_argument(
        "--config",
        type=Path,
        help="resolver config to check (default: the one the installed rule names)",
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = parser.parse_args(list(argv or []))
    from kmskeys.errors import InvalidNameError
    from kmskeys.names import validate_prefix

    try:
        validate_prefix(args.prefix)
    except InvalidNameError as exc:
        parser.error(str(exc))
    failed = False
    collected = []
    for finding in findings(args.prefix, args.config):
        failed |= finding.level == FAIL
        if args.json:
            collected.append(finding.as_dict())
        else:
            print(finding.line(), flush=True)
    if args.json:
        json.dump(
            {"ok": not failed, "prefix": args.prefix, "findings": collected}, sys.stdout, indent=2
        )
        sys.stdout.write("\n")
    return 1 if failed else 0
