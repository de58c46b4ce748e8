"""The upcall probe (kmskeys/upcall_probe.py) answers what an independent request finds.

The cross-check uses other tools for the same question: keyctl(1) as root, and keyctl under
setpriv(1) as a real non-root uid, against a rule of the test's own whose program records its
invocation.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from kmskeys.upcall_probe import REQUEST_KEY_D, UpcallOutcome, nobody, probe, probe_upcalls
from tests.support.names import unique_prefix
from tests.support.request_key_rule import recorded_request
from tests.support.requester import as_user

pytestmark = pytest.mark.upcall


def test_probe_agrees_with_keyctl_as_root_and_under_setpriv(tmp_path: Path) -> None:
    caps = probe_upcalls()
    uid, gid = nobody()
    (tmp_path / "root").mkdir()
    (tmp_path / "nobody").mkdir()
    root_ran, root_got = recorded_request(tmp_path / "root", [])
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    user_ran, user_got = recorded_request(tmp_path / "nobody", setpriv)
    assert (caps.root.ran, caps.root.works) == (root_ran, root_got), caps.root
    assert (caps.non_root.ran, caps.non_root.works) == (user_ran, user_got), caps.non_root
    # Whatever this host allows, the kernel passes the requester's fsuid as %u.
    for outcome, expected in ((caps.root, 0), (caps.non_root, uid), (caps.fsuid, uid)):
        assert outcome.uid == (expected if outcome.ran else None), outcome


def _leftovers(prefix: str) -> list[str]:
    found = [str(p) for p in REQUEST_KEY_D.glob(f"{prefix}*")]
    found += [str(p) for p in Path(tempfile.gettempdir()).glob(f"{prefix}-*")]
    found += [line for line in Path("/proc/keys").read_text().splitlines() if prefix in line]
    return found


def test_probe_cleans_up_after_success_failure_and_timeout() -> None:
    prefix = unique_prefix()

    def fails() -> None:
        raise RuntimeError("becoming this requester failed")

    def hangs() -> None:
        time.sleep(30)

    start = time.monotonic()
    found = probe({"ok": lambda: None, "fails": fails, "hangs": hangs}, timeout=1, prefix=prefix)
    assert time.monotonic() - start < 10
    assert found["ok"] == UpcallOutcome(ran=True, uid=0, error=None)
    assert found["fails"] == UpcallOutcome(ran=False, uid=None, error="RuntimeError")
    assert found["hangs"] == UpcallOutcome(ran=False, uid=None, error="timed out")
    # The probe key was invalidated by its child; the key GC reaps it asynchronously.
    deadline = time.monotonic() + 5
    while _leftovers(prefix) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers(prefix) == []


def test_probe_needs_root_and_says_so() -> None:
    assert as_user("nobody", lambda: probe_upcalls(1.0), mode="setuid") == {
        "error": "PermissionError",
        "errno": None,
    }
