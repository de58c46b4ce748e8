"""/proc/keys confirmed line by line (issue 20.7): a forged line names no key to act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmskeys import Keyring, prockeys
from tests.support.names import unique

pytestmark = pytest.mark.kernel


def test_a_forged_line_is_skipped_and_real_keys_are_confirmed(session_keyring: Keyring) -> None:
    target = session_keyring.add_key("user", f"kmst-target-{unique()}", b"x")
    name = f"kms:{unique()}"
    # A description holding a newline, then a whole line that claims the target's serial is a
    # kms: key of uid 0 with the admin gid: what a user can put in root's view.
    forged = f"{target.serial:08x} I--Q---     1 perm 3f0b0800     0   995 user      {name}: 5"
    carrier = session_keyring.add_key("user", f"kmst-carrier\n{forged}", b"y")
    assert forged in Path("/proc/keys").read_text()

    raw = [k for k in prockeys.lines() if k.serial == target.serial]
    assert len(raw) == 2  # the target's own line, and the forgery
    confirmed = prockeys.keys()
    assert confirmed[target.serial].description == target.describe().description
    assert not [k for k in confirmed.values() if k.description == name]
    # The carrier's own line shows only the part before the newline: not its description.
    assert carrier.serial not in confirmed


def test_a_description_that_looks_like_a_summary_is_the_kernels(session_keyring: Keyring) -> None:
    desc = f"kmst-odd-{unique()}: 5"
    key = session_keyring.add_key("user", desc, b"abc")
    found = prockeys.keys(lambda k: k.serial == key.serial)
    assert found[key.serial].description == desc and found[key.serial].size == 3
