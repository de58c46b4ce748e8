"""checkov over terraform/, offline: zero failed checks, and every skip justified inline."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.terraform import checkov
from tests.terraform.conftest import MODULE_NAMES

pytestmark = pytest.mark.terraform


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """checkov's report: started when the session started (tests/terraform/checkov.py)."""
    if not checkov.CHECKOV.exists():
        pytest.fail(f"{checkov.CHECKOV} is missing: run `make .venv-checkov/.installed`")
    status, stdout, stderr = checkov.report()
    # checkov exits 1 when a check fails; the JSON says which, so decide on that.
    assert status in (0, 1), stderr[-2000:]
    parsed = json.loads(stdout)
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
