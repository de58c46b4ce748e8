"""`kmskeys doctor` as root where IMDS answers everyone: FAIL, the fix pasted, then ok.

In a namespace with the stand-in IMDS on lo, doctor's forked uid-nobody probe connects, so no
firewall keeps app users off the instance role. The printed fix is pasted into a shell in the
same namespace; doctor then finds root still reaching IMDS and nobody refused.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.netns.conftest import Netns

pytestmark = pytest.mark.netns

BIN = Path(sys.executable).parent
DOCTOR = f"{shlex.quote(str(BIN / 'kmskeys'))} doctor --json || true"


def _imds_after(netns: Netns, script: str) -> dict[str, Any]:
    """The imds finding of doctor run as root at the end of `script`, in the namespace."""
    env_path = f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    done = netns.run("env", f"PATH={env_path}", "bash", "-e", stdin=f"{script}\n{DOCTOR}\n")
    report = json.loads(done.stdout[done.stdout.rfind('{\n  "ok"') :])
    (found,) = [f for f in report["findings"] if f["check"] == "imds"]
    return found


def test_imds_open_to_app_users_fails_and_the_fix_closes_it(netns: Netns) -> None:
    before = _imds_after(netns, "")
    assert before["level"] == "FAIL", before
    assert "reachable by root and by uid nobody" in before["message"]
    assert before["fix"].endswith("kmskeys-resolver firewall apply")
    try:
        after = _imds_after(netns, before["fix"])
        assert after["level"] == "ok", after
        assert "and not by uid nobody" in after["message"]
    finally:
        netns.firewall("remove")
