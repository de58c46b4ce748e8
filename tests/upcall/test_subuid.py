"""Per-uid limits per /etc/subuid owner (issue 20.8, third bullet): a user with a subordinate
uid range (rootless containers) gets one share of each per-uid limit, not one per uid.

The test adds a range of its own to the real /etc/subuid (tests/support/subuid.py) owned by
`nobody`; its uids request through the real upcall (emulated where the host needs it), with the
resolver daemon and with the handler: kmskeys-gate charges the slots (resolver/gate_subuid.c),
the resolver the bucket and the host cache (resolver/limits.py charged_uid). The parsing rules
themselves, C and Python alike: tests/unit/test_subuid.py.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import encryptor
from kmskeys import Key
from tests.support.names import unique
from tests.support.requester import NOBODY, as_user
from tests.support.subuid import requester, subuid_range
from tests.upcall.harness import Install
from tests.upcall.refreshing import bucket_tokens, host_cache_entries, purge_host_cache

pytestmark = pytest.mark.upcall

UIDS = 8
BURST = 3
# A bucket that does not refill during the test (one token in ~17 min).
SLOW = {"host_cache": False, "kms_rate_per_uid": 0.001, "kms_burst_per_uid": BURST}


def _each_asks(install: Install, uids: list[int], name: str) -> list[object]:
    assert install.proxy is not None
    install.proxy.reset_counts()
    return [as_user(requester(uid), lambda: install.get(name).decode()) for uid in uids]


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "handler"])
def test_eight_uids_of_one_range_share_their_owners_bucket(
    extra_install: Callable[..., Any], daemon: bool
) -> None:
    with subuid_range("nobody", UIDS) as uids, extra_install(daemon=daemon, **SLOW) as install:
        name = unique("subuid")
        install.deploy(name, install.blob(b"kmst-subuid", name))
        results = _each_asks(install, uids, name)
        assert results[:BURST] == [{"ok": "kmst-subuid"}] * BURST, results
        busy = {"error": "TemporarilyUnavailableError", "errno": 11}
        assert results[BURST:] == [busy] * (UIDS - BURST), results
        # KMS saw the owner's burst, not one burst per uid.
        assert install.decrypts() == BURST
        lines = [install.log.wait_for(name) for _ in uids]
        assert all(f"(charged to uid {NOBODY}, /etc/subuid)" in ln for ln in lines[BURST:]), lines
        tokens = bucket_tokens(install, NOBODY)
        assert tokens is not None and tokens < 1
        assert all(bucket_tokens(install, uid) is None for uid in uids)


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "handler"])
def test_without_aggregation_each_uid_has_its_own_bucket(
    extra_install: Callable[..., Any], daemon: bool
) -> None:
    with (
        subuid_range("nobody", UIDS) as uids,
        extra_install(daemon=daemon, aggregate_subuids=False, **SLOW) as install,
    ):
        name = unique("subuidoff")
        install.deploy(name, install.blob(b"kmst-subuid-off", name))
        assert _each_asks(install, uids, name) == [{"ok": "kmst-subuid-off"}] * UIDS
        assert install.decrypts() == UIDS


@contextmanager
def _holding_slots(install: Install, uid: int, slots: int) -> Iterator[None]:
    """Hold every slot of `uid` in the install's state_dir, as busy requests would."""
    state = Path(install.settings["state_dir"])
    state.mkdir(mode=0o700, exist_ok=True)
    fds = []
    try:
        for index in range(slots):
            fd = os.open(state / f"slot-{uid}-{index}", os.O_RDWR | os.O_CREAT, 0o600)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "handler"])
def test_a_range_shares_its_owners_slots(extra_install: Callable[..., Any], daemon: bool) -> None:
    slots = 2
    with (
        subuid_range("nobody", UIDS) as uids,
        extra_install(daemon=daemon, max_concurrent_per_uid=slots) as install,
    ):
        install.proxy.reset_counts()
        with _holding_slots(install, NOBODY, slots):
            for uid in uids:
                name = unique("subslot")
                blob = install.blob(b"v", name)

                def ask(name: str = name, blob: str = blob) -> str:
                    return install.get(name, blob).decode()

                got = as_user(requester(uid), ask)
                assert got == {"error": "TemporarilyUnavailableError", "errno": 11}, got
                line = install.log.wait_for(name)
                # The gate's words (resolver/gate.c), before any Python starts.
                assert (
                    f"uid {NOBODY} already has {slots} requests being resolved" in line
                    and f"uid {uid} is charged to it" in line
                ), line
            # Root is no one's subordinate: its slots are its own.
            name = unique("subroot")
            install.deploy(name, install.blob(b"r", name))
            assert install.get(name) == b"r"
        assert install.decrypts() == 1


def test_a_ranges_host_cache_entries_are_charged_to_its_owner(
    extra_install: Callable[..., Any],
) -> None:
    with (
        subuid_range("nobody", 4) as uids,
        extra_install(allow_legacy_blobs=True, host_cache_keys_per_uid=2) as install,
    ):
        try:
            blob = encryptor.encrypt_raw(
                b"kmst-subuid-legacy", install.key_arn, client=install.kms()
            )
            text = blob.to_text()
            names = [unique("subuidhc") for _ in uids]
            for uid, name in zip(uids, names, strict=True):

                def ask(name: str = name) -> str:
                    return Key.request(install.description(name), text).read().decode()

                assert as_user(requester(uid), ask) == {"ok": "kmst-subuid-legacy"}
            lines = [install.log.wait_for(name) for name in names]
            assert all(' cache="' not in ln for ln in lines[:2]), lines
            assert all(f'cache="not kept: uid {NOBODY} is at its' in ln for ln in lines[2:]), lines
            assert len(host_cache_entries(install.prefix)) == 2
        finally:
            purge_host_cache(install.prefix)
