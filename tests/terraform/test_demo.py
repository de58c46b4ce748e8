"""`make demo-terraform` runs every step, says that moto does not enforce IAM, and cleans up."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from tests.terraform.conftest import DemoRun

pytestmark = [pytest.mark.terraform, pytest.mark.upcall]


def test_the_demo_succeeds_step_by_step(demo_run: DemoRun) -> None:
    assert demo_run.done.returncode == 0, demo_run.output[-4000:]
    numbered = re.findall(r"^\[(\d+)/(\d+)\] ", demo_run.done.stdout, flags=re.M)
    assert numbered == [(str(n), "8") for n in range(1, 9)]
    assert re.search(r"^demo OK: 8 steps in [\d.]+ s", demo_run.done.stdout, flags=re.M)
    assert "FAILED" not in demo_run.output


def test_the_demo_says_moto_does_not_enforce_iam(demo_run: DemoRun) -> None:
    assert "note: moto does not enforce IAM" in demo_run.done.stdout
    assert "(moto does not enforce IAM)" in demo_run.done.stdout


def test_the_demo_used_the_roles_terraform_created(demo_run: DemoRun) -> None:
    out = demo_run.done.stdout
    (ci_role,) = re.findall(r"ci_role_arn = (\S+)", out)
    assert f"as {ci_role.replace(':iam:', ':sts:').replace(':role/', ':assumed-role/')}/" in out
    (encrypted,) = re.findall(r"secret sha256 ([0-9a-f]{16}) -> blob", out)
    (got,) = re.findall(r"sha256 ([0-9a-f]{16}) \(matches what CI encrypted\)", out)
    assert got == encrypted
    assert re.search(r"resolver log: .*name=web/db-password .*outcome=ok", out)
    assert "InvalidCiphertextException" in out  # the seal refused another instance's ARN


def test_the_demo_left_nothing_behind(demo_run: DemoRun) -> None:
    out = demo_run.done.stdout
    (rule,) = re.findall(r"(/etc/request-key\.d/kmskeys-kmst\w+\.conf) removed", out)
    assert not Path(rule).exists()
    (port,) = re.findall(r"resources in moto http://127\.0\.0\.1:(\d+)", out)
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", int(port)))  # the demo's moto server is gone
    assert "nothing left behind" in out
    assert "keys pending deletion" in out
