"""checkov over terraform/, offline: zero failed checks, and every skip justified inline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import pytest

from tests.terraform.conftest import MODULE_NAMES, REPO, TERRAFORM

pytestmark = pytest.mark.terraform

# checkov lives in its own venv (mk/terraform.mk) so its pins never fight the dev dependencies.
CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"

# No platform API key, no download of external checks, no guideline mapping: nothing to fetch.
OFFLINE_ENV = {"BC_SKIP_MAPPING": "TRUE", "CKV_NO_DOWNLOAD": "TRUE", "LOG_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: run `make .venv-checkov/.installed`", pytrace=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "CKV_", "PRISMA"))}
    command = [
        str(CHECKOV),
        "--directory",
        str(TERRAFORM),
        "--framework",
        "terraform",
        "--skip-download",
        "--output",
        "json",
    ]
    # As root (CI), run in an empty network namespace: any attempt to reach out fails at once.
    if os.geteuid() == 0 and shutil.which("unshare"):
        command = ["unshare", "--net", *command]
    done = subprocess.run(
        command,
        env={**env, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    # checkov exits 1 when a check fails; the JSON says which, so decide on that.
    assert done.returncode in (0, 1), done.stderr[-2000:]
    parsed = json.loads(done.stdout)
    assert isinstance(parsed, dict), "expected a single terraform report"
    return parsed


def test_checkov_finds_no_failed_check(report: dict[str, Any]) -> None:
    failed = [
        f"{c['check_id']} {c['check_name']} at {c['file_path']} {c['resource']}"
        for c in report["results"]["failed_checks"]
    ]
    assert failed == []
    assert report["summary"]["failed"] == 0


def test_checkov_parsed_and_checked_every_module(report: dict[str, Any]) -> None:
    summary = report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["passed"] >= 50
    checked = {c["file_path"] for c in report["results"]["passed_checks"]}
    for module in MODULE_NAMES:
        assert f"/modules/{module}/main.tf" in checked, module


def test_every_skipped_check_says_why(report: dict[str, Any]) -> None:
    for check in report["results"]["skipped_checks"]:
        comment = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(comment) > 20, f"{check['check_id']} skipped without a reason"
