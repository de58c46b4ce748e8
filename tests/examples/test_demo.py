"""`make demo` (scripts/demo.py) runs every step for real, shows no secret and leaves nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.examples.conftest import ROOT
from tests.support.names import unique_prefix

pytestmark = pytest.mark.examples

DEMO = ROOT / "scripts" / "demo.py"


def test_demo_succeeds_and_cleans_up(session_keyring: object) -> None:
    prefix = unique_prefix()
    done = subprocess.run(
        [sys.executable, str(DEMO), "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert [int(n) for n in re.findall(r"^\[(\d)/7\]", out, re.M)] == list(range(1, 8))
    assert len(re.findall(r"^      ok \d+\.\d\d s", out, re.M)) == 7
    assert "KMS Decrypt calls: 1" in out and "KMS Decrypt calls: 2" in out
    assert "nothing left behind" in out
    assert out.rstrip().splitlines()[-1].startswith("demo OK")
    assert not Path(f"/etc/request-key.d/kmskeys-{prefix}.conf").exists()
    # Two different fingerprints (before and after the rotation), and no word shaped like the
    # demo's secrets (token_urlsafe(24): exactly 32 characters of the URL-safe alphabet).
    fingerprints = set(re.findall(r"sha256 ([0-9a-f]{16})", out))
    assert len(fingerprints) == 2
    assert not re.search(r"(?<![\w-])[\w-]{32}(?![\w-])", out + done.stderr)


def test_a_failing_step_fails_the_demo_and_still_cleans_up(session_keyring: object) -> None:
    # Upper case is not a valid prefix: the resolver install (step 3) refuses the config.
    prefix = unique_prefix() + "-BAD"
    done = subprocess.run(
        [sys.executable, str(DEMO), "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 1
    assert re.search(r"^\[3/7\].*\n      FAILED", done.stdout, re.M), done.stdout
    assert "prefix" in done.stderr
    assert "[7/7] clean up" in done.stdout
    assert "nothing left behind" in done.stdout
    assert "demo FAILED" in done.stderr
    assert not Path(f"/etc/request-key.d/kmskeys-{prefix}.conf").exists()
