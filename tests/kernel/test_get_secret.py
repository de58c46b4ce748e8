"""get_secret against the real keyring: only a key owned by the caller's fsuid is ever read,
the hit path (one keyctl_read of a recently checked serial) never outlives what the kernel
allows (the keyring option is tested through the resolver: tests/upcall/test_keyrings.py)."""

from __future__ import annotations

import time

import pytest

from kmskeys import (
    InvalidArgumentError,
    KeyOwnershipError,
    Keyring,
    KmsKeysError,
    get_secret,
    keyutils,
)
from kmskeys.contract import USER_PAYLOAD_MAX
from kmskeys.names import MAX_NAME_BYTES
from tests.support.names import unique_prefix
from tests.support.requester import NOBODY, as_user
from tests.support.ttl import MIN_TTL, gone_after

pytestmark = pytest.mark.kernel

OPEN = 0x3F3F3F3F


def _cached(ring: Keyring, prefix: str, name: str, payload: bytes) -> int:
    return ring.add_key("user", f"{prefix}:{name}", payload).serial


def test_a_long_name_and_the_largest_payload(session_keyring: Keyring) -> None:
    # The ownership check reads the whole description: it must not stop at a short buffer.
    prefix, name = unique_prefix(), "n" * MAX_NAME_BYTES
    payload = bytes(i % 251 for i in range(USER_PAYLOAD_MAX))
    _cached(session_keyring, prefix, name, payload)
    assert get_secret(name, prefix=prefix) == payload
    assert get_secret(name, prefix=prefix) == payload  # the hit path, too


def test_a_key_of_another_uid_is_never_read(session_keyring: Keyring) -> None:
    prefix = unique_prefix()
    serial = _cached(session_keyring, prefix, "planted", b"kmst-planted")
    keyutils.keyctl_setperm(serial, OPEN)
    keyutils.keyctl_chown(serial, NOBODY, -1)  # as if nobody had planted it here
    with pytest.raises(KeyOwnershipError) as caught:
        get_secret("planted", prefix=prefix)
    assert caught.value.owner == NOBODY and caught.value.serial == serial
    assert f"owned by uid {NOBODY}, not by uid 0" in str(caught.value)
    assert "kmst-planted" not in str(caught.value)


def test_the_hit_path_is_checked_again_after_an_identity_change(
    session_keyring: Keyring,
) -> None:
    prefix = unique_prefix()
    serial = _cached(session_keyring, prefix, "rootkey", b"kmst-root")
    keyutils.keyctl_setperm(serial, OPEN)  # readable by all, so only ownership stops nobody
    assert get_secret("rootkey", prefix=prefix) == b"kmst-root"  # checked for uid 0 just now

    def as_nobody_in_the_same_keyring() -> object:
        try:
            return get_secret("rootkey", prefix=prefix).decode()
        except KeyOwnershipError as exc:
            return {"foreign": exc.owner}

    # The child inherits this thread's recent checks; for another fsuid they do not count.
    got = as_user(NOBODY, as_nobody_in_the_same_keyring, session="inherit", mode="fsuid")
    assert got == {"ok": {"foreign": 0}}


def test_the_hit_path_never_outlives_the_key(session_keyring: Keyring) -> None:
    prefix = unique_prefix()
    serial = _cached(session_keyring, prefix, "rotated", b"kmst-v1")
    assert get_secret("rotated", prefix=prefix) == b"kmst-v1"
    # Updated in place (same serial): the next read has the new payload.
    assert _cached(session_keyring, prefix, "rotated", b"kmst-v2") == serial
    assert get_secret("rotated", prefix=prefix) == b"kmst-v2"
    # Invalidated (`kmskeys flush`): never served again, not even within the second.
    keyutils.keyctl_invalidate(serial)
    with pytest.raises(KmsKeysError):
        get_secret("rotated", prefix=prefix)


def test_the_hit_path_never_outlives_an_expiry(session_keyring: Keyring) -> None:
    prefix = unique_prefix()
    serial = _cached(session_keyring, prefix, "expiring", b"kmst-short")
    keyutils.keyctl_set_timeout(serial, MIN_TTL)
    set_at = time.monotonic()
    assert get_secret("expiring", prefix=prefix) == b"kmst-short"
    # Keep hitting: each read is one the kernel allows, and ends when the key expires.
    while time.monotonic() < set_at + gone_after(MIN_TTL):
        try:
            assert get_secret("expiring", prefix=prefix) == b"kmst-short"
        except KmsKeysError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the key was still served after its timeout")


def test_an_unknown_keyring_is_a_clear_error() -> None:
    with pytest.raises(InvalidArgumentError, match="session, user, persistent"):
        get_secret("x", keyring="thread")


def test_the_hit_path_remembers_a_key_per_keyring_asked_for(session_keyring: Keyring) -> None:
    """Within the second, a key found for one keyring is no answer for another: asked for with
    keyring=RING, the key is linked into RING (request_key(2) links what it finds), however
    recently the same name was read for the session keyring."""
    prefix = unique_prefix()
    serial = _cached(session_keyring, prefix, "twice", b"kmst-twice")
    ring = session_keyring.add_key("keyring", f"{prefix}:ring", b"")
    assert Keyring(ring.serial).list() == []
    assert get_secret("twice", prefix=prefix, keyring="session") == b"kmst-twice"
    assert get_secret("twice", prefix=prefix, keyring=Keyring(ring.serial)) == b"kmst-twice"
    assert [key.serial for key in Keyring(ring.serial).list()] == [serial]
