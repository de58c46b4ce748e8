"""The resolver the rule runs can import what a miss needs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from kmskeys.checkreport import CheckReport
from kmskeys.doctor.finding import FAIL, OK, Finding, q
from kmskeys.doctor.fixes import own_resolver


def check_dependencies(report: CheckReport, prefix: str) -> Iterator[Finding]:
    """The resolver the rule runs can import what a miss needs."""
    missing = report["dependencies"]
    program = Path(report["resolver"])
    if missing is None:
        yield Finding(OK, "dependencies", f"{program} imports botocore and cryptography")
        return
    import importlib.util

    mine = own_resolver()
    complete = all(importlib.util.find_spec(m) for m in ("botocore", "cryptography"))
    config = Path(report["config_path"])
    if mine is not None and complete and Path(os.path.abspath(mine)) != program:
        fix = f"{q(mine)} install --config {q(config)} --prefix {q(prefix)}"
    else:
        fix = f"{q(report['python'])} -m pip install 'kmskeys[resolver]'"
    yield Finding(
        FAIL,
        "dependencies",
        f"the resolver {program} lacks a dependency ({missing}): every miss fails with EAGAIN",
        fix,
    )
