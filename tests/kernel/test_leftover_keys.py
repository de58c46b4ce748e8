"""The session's leftover-key check (tests/support/leftover_keys.py) finds a key a test left in
a keyring that outlives it, and only the names this session issued."""

from __future__ import annotations

import pytest

from kmskeys import Keyring, keyutils
from tests.support.leftover_keys import leftover, leftover_after_gc
from tests.support.names import issued, unique, unique_prefix

pytestmark = pytest.mark.kernel


def test_a_key_left_in_roots_user_keyring_is_found_until_removed() -> None:
    prefix, name = unique_prefix(), unique("left")
    assert {prefix, name} <= issued()
    user = Keyring.user()
    serial = user.add_key("user", f"{prefix}:{name}", b"x").serial
    try:
        found = leftover({prefix})
        assert len(found) == 1 and f"{serial:08x}" in found[0] and name in found[0], found
        assert leftover({name}) == found
        assert leftover({unique_prefix()}) == []  # another session's names are not ours
    finally:
        keyutils.keyctl_unlink(serial, keyutils.KEY_SPEC_USER_KEYRING)
    assert leftover_after_gc({prefix}) == []


def test_a_revoked_key_is_on_its_way_out(session_keyring: Keyring) -> None:
    name = unique("revoked")
    key = session_keyring.add_key("user", f"kmst:{name}", b"x")
    assert leftover({name})
    keyutils.keyctl_revoke(key.serial)
    assert leftover({name}) == []
