"""`kmskeys doctor` explains the installed resolver, one line and a fix per finding."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.names import unique_prefix
from tests.upcall.conftest import KMSKEYS, Install

pytestmark = pytest.mark.upcall


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KMSKEYS), "doctor", *args], check=False, capture_output=True, text=True, timeout=30
    )


def test_doctor_passes_a_good_install(resolver_install: Install) -> None:
    done = _doctor("--prefix", resolver_install.prefix, "--config", str(resolver_install.config))
    assert done.returncode == 0, done.stdout
    assert f"ok   config {resolver_install.config} is root-owned and safe" in done.stdout
    assert f"ok   blob_dir {resolver_install.blob_dir} is root-owned and safe" in done.stdout
    assert "key quota" in done.stdout and "IMDS" in done.stdout


def test_doctor_flags_a_missing_rule_and_an_unsafe_blob_dir(resolver_install: Install) -> None:
    os.chmod(resolver_install.blob_dir, 0o777)
    try:
        done = _doctor("--prefix", unique_prefix(), "--config", str(resolver_install.config))
    finally:
        os.chmod(resolver_install.blob_dir, 0o755)
    assert done.returncode == 1
    assert "FAIL no rule" in done.stdout and "fix: kmskeys-resolver install" in done.stdout
    assert f"FAIL blob_dir {resolver_install.blob_dir} is writable" in done.stdout
