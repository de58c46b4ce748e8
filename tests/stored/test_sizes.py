"""Issue 20 point 4 through the real upcall: no requester chooses the size of a shared key.

The first uid to ask for a machine-scope name used to set its key size with its callout; every
later request of the usual size was then refused for good (version 1 is never made again). Now a
machine-scope key is made at the policy's `key_size`, 32 bytes without one, or at the size root's
`stored create` gives it; a request for another size is refused and writes nothing. A user-scope
key's size may still come from its own user's first request (only that user ever uses it),
unless the policy sets one.
"""

from __future__ import annotations

import hashlib

import pytest

import kmskeys
from kmskeys import KeyRejectedError, Keyring
from tests.stored.conftest import SIZED, UID_A, UID_B, as_user
from tests.stored.harness import StoredInstall
from tests.support.names import unique
from tests.upcall.harness import run_resolver

pytestmark = pytest.mark.upcall

# unique("machine") is machine-scoped; unique("msized") machine-scoped at SIZED bytes by
# policy; unique("usized") user-scoped at SIZED bytes (tests/stored/conftest.py).


def _digest(install: StoredInstall, name: str, size: int) -> object:
    return lambda: hashlib.sha256(install.request(name, str(size))).hexdigest()


def _admin(install: StoredInstall, *args: str) -> tuple[int, str]:
    done = run_resolver("stored", "--config", str(install.config), *args)
    return done.returncode, done.stdout + done.stderr


def test_a_first_requesters_odd_size_does_not_fix_a_machine_key(stored: StoredInstall) -> None:
    name = unique("machine")
    odd = as_user(UID_A, _digest(stored, name, 64))
    assert odd["error"] == "KeyRejectedError", odd
    line = stored.log.wait_for(name)
    assert "is made 32 bytes here" in line and "asks for 64" in line, line
    assert stored.entries_of(name) == []  # nothing written
    # B, and then A, ask for the usual size: one key, the same for both.
    for_b, for_a = (
        as_user(UID_B, _digest(stored, name, 32)),
        as_user(UID_A, _digest(stored, name, 32)),
    )
    assert "ok" in for_b and for_a == for_b
    assert len(stored.entry(name, uid=None).read_bytes()) > 32
    # And DPAPI works for both on the machine-scope key.
    prefix = stored.stored_prefix
    blob = as_user(
        UID_A, lambda: kmskeys.protect(b"shared", name=name, scope="machine", prefix=prefix)
    )
    text = str(blob["ok"])
    opened = as_user(UID_B, lambda: kmskeys.unprotect(text, prefix=prefix).decode())
    assert opened == {"ok": "shared"}


def test_the_policy_key_size_makes_machine_and_user_keys(stored: StoredInstall) -> None:
    shared, own = unique("msized"), unique("usized")
    for name in (shared, own):
        assert as_user(UID_A, _digest(stored, name, 32))["error"] == "KeyRejectedError"
        line = stored.log.wait_for(name)
        assert f"is made {SIZED} bytes here (policy" in line and "key_size" in line, line
        assert stored.entries_of(name) == []
    a = as_user(UID_A, lambda: len(stored.request(shared, str(SIZED))))
    b = as_user(UID_B, _digest(stored, shared, SIZED))
    assert a == {"ok": SIZED} and "ok" in b
    assert as_user(UID_A, _digest(stored, shared, SIZED)) == b  # machine scope: one key
    assert as_user(UID_A, lambda: len(stored.request(own, str(SIZED)))) == {"ok": SIZED}
    # A rotation follows the policy; a --size against it is refused.
    code, out = _admin(stored, "rotate", shared, "--machine", "--size", "32")
    assert code == 1 and f"is {SIZED} bytes by policy" in out, out
    code, out = _admin(stored, "rotate", shared, "--machine")
    assert code == 0, out
    Keyring.join_session()
    assert len(stored.request(shared, str(SIZED), "#machine#v2")) == SIZED


def test_a_user_scope_key_is_its_own_users_choice(stored: StoredInstall) -> None:
    name = unique("ownsize")
    assert as_user(UID_A, lambda: len(stored.request(name, "64"))) == {"ok": 64}
    # B's key of the same name is B's, of B's size: A's choice changed nothing for B.
    assert as_user(UID_B, lambda: len(stored.request(name, "32"))) == {"ok": 32}


def test_root_creates_a_machine_key_of_its_choosing(stored: StoredInstall) -> None:
    name = unique("machine")
    code, out = _admin(stored, "create", name, "--machine", "--size", "64")
    assert code == 0 and f"machine/{name}#v1: created" in out, out
    a, b = as_user(UID_A, _digest(stored, name, 64)), as_user(UID_B, _digest(stored, name, 64))
    assert "ok" in a and a == b
    for _ in range(2):
        assert "outcome=ok" in stored.log.wait_for(name)
    refused = as_user(UID_B, _digest(stored, name, 32))
    assert refused["error"] == "KeyRejectedError"
    assert "is 64 bytes, the request asks for 32" in stored.log.wait_for(name)
    code, out = _admin(stored, "create", name, "--machine")
    assert code == 1 and "exists already" in out and "rotate" in out, out
    # A policy size is the policy's: root's --size cannot contradict it.
    code, out = _admin(stored, "create", unique("msized"), "--machine", "--size", "16")
    assert code == 1 and f"is {SIZED} bytes by policy" in out, out
    # A user-scope key made by root for a uid.
    mine = unique("rootmade")
    code, out = _admin(stored, "create", mine, "--uid", str(UID_A), "--size", "24")
    assert code == 0, out
    assert as_user(UID_A, lambda: len(stored.request(mine, "24"))) == {"ok": 24}


def test_stored_key_without_selector_stays_usable_for_every_uid(stored: StoredInstall) -> None:
    # The essay's `stored:NAME` (version 1, for ever) on a machine-scope name: the usual size
    # works for everyone, whoever asked first and whatever they asked.
    name = unique("machine")
    assert as_user(UID_A, _digest(stored, name, 4096))["error"] == "KeyRejectedError"
    for uid in (UID_B, UID_A, 0):
        assert "ok" in as_user(uid, _digest(stored, name, 32)), uid
    with pytest.raises(KeyRejectedError):
        Keyring.join_session()
        stored.request(name, "16")
