"""Issue 20 point 2 through the real upcall: the keystore cannot be grown without bound.

A uid allowed a `stored:` name could create entries as fast as it could ask for new names,
requests the kernel's key quota refused still wrote their entry, and nothing was reclaimed. Now
each uid's new entries are capped (count and bytes, `keystore_entries_per_uid`,
`keystore_bytes_per_uid`), each costs a token of its bucket, machine-scope entries are charged to
the uid whose request created them, and a request that cannot be answered writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from kmskeys import Keyring, QuotaExceededError
from tests.stored.conftest import UID_A, UID_B, _policy, as_user
from tests.stored.harness import StoredInstall, stored_installed
from tests.support.names import unique

pytestmark = pytest.mark.upcall


@contextmanager
def _install(**settings: Any) -> Iterator[StoredInstall]:
    with stored_installed(names=_policy(), **settings) as install:
        yield install


def _request(install: StoredInstall, name: str, size: str = "32") -> Callable[[], object]:
    """A's or B's request, as a result dict: {"ok": key length} or {"error": ...}."""
    return lambda: len(install.request(name, size))


def _written(install: StoredInstall, name: str) -> list[str]:
    return [str(p) for p in install.files() if name in str(p)]


def test_the_entry_cap_holds_and_refuses_the_next_new_name(session_keyring: object) -> None:
    with _install(keystore_entries_per_uid=3) as store:
        names = [unique("cap") for _ in range(4)]
        for name in names[:3]:
            assert as_user(UID_A, _request(store, name)) == {"ok": 32}
        refused = as_user(UID_A, _request(store, names[3]))
        assert refused["error"] == "KeyRejectedError", refused
        line = store.log.wait_for(names[3])
        assert "errno=EKEYREJECTED" in line and "keystore_entries_per_uid" in line, line
        assert f"uid {UID_A}" in line and "nothing was written" in line, line
        assert _written(store, names[3]) == []
        # What A has stays A's: existing keys answer, in a fresh keyring too.
        assert as_user(UID_A, _request(store, names[0])) == {"ok": 32}
        # B has a cap of its own.
        assert as_user(UID_B, _request(store, names[3])) == {"ok": 32}


def test_the_byte_cap_counts_each_entrys_size(session_keyring: object) -> None:
    # An entry of a 32-byte key takes about 130 bytes here, of a 4096-byte key about 4200.
    with _install(keystore_bytes_per_uid=4096) as store:
        big, small = unique("capbig"), unique("capsmall")
        refused = as_user(UID_A, _request(store, big, "4096"))
        assert refused["error"] == "KeyRejectedError", refused
        line = store.log.wait_for(big)
        assert "keystore_bytes_per_uid" in line and "nothing was written" in line, line
        assert _written(store, big) == []
        assert as_user(UID_A, _request(store, small)) == {"ok": 32}


def test_machine_scope_entries_are_charged_to_the_uid_that_created_them(
    session_keyring: object,
) -> None:
    with _install(keystore_entries_per_uid=2) as store:
        shared = unique("machine")
        assert as_user(UID_A, _request(store, shared)) == {"ok": 32}  # A creates: A pays
        assert as_user(UID_B, _request(store, shared)) == {"ok": 32}  # B reads: free
        mine_a, mine_b = [unique("capa") for _ in range(2)], [unique("capb") for _ in range(2)]
        assert as_user(UID_A, _request(store, mine_a[0])) == {"ok": 32}
        assert as_user(UID_A, _request(store, mine_a[1]))["error"] == "KeyRejectedError"
        for name in mine_b:  # B created nothing yet: both fit
            assert as_user(UID_B, _request(store, name)) == {"ok": 32}


def test_each_new_entry_costs_a_token_of_the_uids_bucket(session_keyring: object) -> None:
    # Two tokens, refilled once in ~17 min: two new names, then EAGAIN and nothing written.
    with _install(kms_rate_per_uid=0.001, kms_burst_per_uid=2) as store:
        names = [unique("rate") for _ in range(3)]
        for name in names[:2]:
            assert as_user(UID_A, _request(store, name)) == {"ok": 32}
        late = as_user(UID_A, _request(store, names[2]))
        assert late["error"] == "TemporarilyUnavailableError", late
        line = store.log.wait_for(names[2])
        assert "errno=EAGAIN" in line and "rate" in line, line
        assert _written(store, names[2]) == []
        # Reading what exists costs no token.
        assert as_user(UID_A, _request(store, names[0])) == {"ok": 32}


def _fill_quota_then_request(install: StoredInstall, name: str) -> str:
    """Fill this uid's key quota but a few bytes, then ask for a 4096-byte key."""
    ring = Keyring.session()
    for size in (4000, 1000, 250, 60, 15, 1):
        added = 0
        while True:
            try:
                ring.add_key("user", f"kmst-fill-{size:04d}-{added:04d}", b"q" * size)
            except QuotaExceededError:
                break
            added += 1
    # Room for the request's own key (its description), never for a 4096-byte payload.
    descriptions = {k.describe().description: k for k in ring.list()}
    freed = sorted(d for d in descriptions if d.startswith(("kmst-fill-0250-", "kmst-fill-1000-")))
    descriptions[freed[0]].unlink(ring)
    time.sleep(0.3)  # the key GC returns the quota asynchronously
    try:
        install.request(name, "4096")
    except QuotaExceededError as exc:
        return type(exc).__name__
    return "answered"


def test_a_request_the_key_quota_refuses_writes_nothing(stored: StoredInstall) -> None:
    name = unique("quota")
    result = as_user(UID_A, lambda: _fill_quota_then_request(stored, name))
    assert result == {"ok": "QuotaExceededError"}, result
    line = stored.log.wait_for(name)
    assert "errno=EDQUOT" in line and "nothing was written" in line, line
    assert _written(stored, name) == []
