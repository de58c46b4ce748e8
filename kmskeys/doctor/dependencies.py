"""The resolver the rule runs can import what a miss needs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kmskeys.checkreport import CheckReport
from kmskeys.doctor.finding import FAIL, OK, Finding, q
from kmskeys.doctor.fixes import recorded


def check_dependencies(report: CheckReport, prefix: str) -> Iterator[Finding]:
    """The resolver the rule runs can import what a miss needs."""
    missing = report["dependencies"]
    program = Path(report["resolver"])
    if missing is None:
        yield Finding(OK, "dependencies", f"{program} imports botocore and cryptography")
        return
    config = Path(report["config_path"])
    record = recorded(prefix, config)
    if record is not None and Path(record.resolver) != program:
        # The rule was pointed at another resolver since install: the install as recorded.
        fix = record.install_command()
    else:
        # The root side's own interpreter (the one the rule runs), never doctor's.
        fix = f"{q(report['python'])} -m pip install 'kmskeys[resolver]'"
    yield Finding(
        FAIL,
        "dependencies",
        f"the resolver {program} lacks a dependency ({missing}): every miss fails with EAGAIN",
        fix,
    )
