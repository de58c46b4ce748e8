"""The resolver's own verdict: `kmskeys-resolver check`, run in the resolver's interpreter.

This client never imports the resolver (the import contracts keep it apart), and the resolver
that matters is the one the installed rule runs; its report's shape is declared once, in
kmskeys/checkreport.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from kmskeys.checkreport import CheckReport, parse_report

CHECK_TIMEOUT = 10.0


def run_check(program: Path, config: Path) -> CheckReport | str:
    """`PROGRAM check --config CONFIG`'s report, or why there is none."""
    try:
        done = subprocess.run(
            [os.fspath(program), "check", "--config", os.fspath(config)],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{program} check could not run ({exc})"
    try:
        decoded = json.loads(done.stdout)
    except ValueError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{program} check failed (exit {done.returncode}: {last})"
    report = parse_report(decoded)
    if report is None:
        return f"{program} check printed a report of another shape (another kmskeys version?)"
    return report
