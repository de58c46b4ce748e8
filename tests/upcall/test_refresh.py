"""Refresh-ahead (issue 26.13): keys renewed in place before they expire, so that a reader never
meets a miss; through the real upcall, the installed resolver and `kmskeys-resolver refresh`.

The loop tests read every 100 ms across several ttl periods of a 4 s ttl (a key lives 3 to 4 s);
the others run `refresh --once` so that what happens to each key is said, not timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from kmskeys import Key, KeyNotFoundError, KmsKeysError
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.names import unique
from tests.support.requester import NOBODY, Steps, as_user
from tests.upcall.harness import Install, installed
from tests.upcall.refreshing import (
    VIA,
    bucket_tokens,
    purge_host_cache,
    recorded,
    records,
    refresh_once,
    refresher,
)

pytestmark = pytest.mark.upcall

TTL = 4
PERIODS = 3


@pytest.fixture(scope="module")
def ahead(kms_backend: tuple[KmsEmulator, KmsProxy, str]) -> Iterator[Install]:
    """An install whose keys live TTL s (no jitter: 4 s never spreads anyway)."""
    emulator, proxy, key_arn = kms_backend
    with installed(emulator, proxy, key_arn, ttl=TTL, ttl_jitter=0) as install:
        try:
            yield install
        finally:
            purge_host_cache(install.prefix)


@pytest.fixture
def fresh(ahead: Install, session_keyring: object) -> Install:
    """The module's install with counts and log reset, in a fresh session keyring."""
    assert ahead.proxy is not None
    ahead.proxy.set_fault(None)
    ahead.proxy.reset_counts()
    ahead.log.drain()
    return ahead


def _lines(install: Install, name: str, refresher: int) -> tuple[list[str], list[str]]:
    """(the handlers' lines, the refresher's renewals) about `name` so far, checked.

    A renewal whose KMS call outlasts stale_wait (a loaded machine) renews the key from the
    stale host-cache entry at once (outcome=stale, via=refresh) and finishes the call in a
    thread of the refresher, which logs a line of its own when it ends (source=background, from
    the refresher's pid): neither is a miss.
    """
    lines = [line for line in install.log.drain() if f" name={name} " in line + " "]
    own = f"[{refresher}]: "
    renewed = [ln for ln in lines if VIA in ln]
    finished = [ln for ln in lines if VIA not in ln and own in ln]
    handler = [ln for ln in lines if VIA not in ln and own not in ln]
    assert all(" outcome=ok " in ln or " outcome=stale " in ln for ln in renewed), renewed
    stale = sum(" outcome=stale " in ln for ln in renewed)
    assert all(" source=background " in ln for ln in finished), finished
    assert len(finished) <= stale, (renewed, finished)
    return handler, renewed


def _read_for(seconds: float, read: Callable[[], object]) -> tuple[list[object], int]:
    """read() every 100 ms for `seconds`: (what each read gave, how many raised)."""
    seen: list[object] = []
    errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            seen.append(read())
        except KmsKeysError:
            errors += 1
        time.sleep(0.1)
    return seen, errors


def test_a_reader_across_ttl_periods_keeps_one_serial_and_never_misses(fresh: Install) -> None:
    name = unique("ahead")
    fresh.deploy(name, fresh.blob(b"kmst-ahead", name))
    with refresher(fresh) as running:
        first = Key.request(fresh.description(name), b"")

        def read() -> tuple[int, bytes]:
            key = Key.request(fresh.description(name), b"")
            return key.serial, key.read()

        seen, errors = _read_for(PERIODS * TTL + 1, read)
    handler, renewed = _lines(fresh, name, running.pid)
    assert errors == 0
    assert set(seen) == {(first.serial, b"kmst-ahead")}, (set(seen), handler, renewed)
    # One miss, the first request; every later read was a hit on the same key.
    assert len(handler) == 1 and " source=blob_dir " in handler[0], handler
    assert len(renewed) >= PERIODS, renewed
    assert all(f" key={first.serial} " in ln for ln in renewed), renewed
    # One KMS call per host per ttl at most: the refresher goes through the host cache.
    assert fresh.decrypts() <= PERIODS + 2, fresh.decrypts()


def test_a_non_root_uids_key_is_renewed_in_its_own_keyring(fresh: Install) -> None:
    # Emulated (euid 0 + fsuid) on hosts that refuse non-root upcalls, a real setuid elsewhere.
    name = unique("aheaduser")
    fresh.deploy(name, fresh.blob(b"kmst-ahead-user", name))

    def read() -> list[object]:
        key = Key.request(fresh.description(name), b"")
        return [key.serial, key.read().decode(), key.describe().uid]

    with refresher(fresh) as running, Steps(NOBODY, [read]) as child:
        assert child.ready() == {"ok": None}
        seen, errors = _read_for(PERIODS * TTL + 1, lambda: child.run(0))
    handler, renewed = _lines(fresh, name, running.pid)
    assert errors == 0
    assert {str(s) for s in seen} == {str(seen[0])}, (seen, handler, renewed)
    assert seen[0] == {"ok": [seen[0]["ok"][0], "kmst-ahead-user", NOBODY]}, seen[0]  # type: ignore[index]
    assert len(handler) == 1, handler
    assert len(renewed) >= PERIODS and all(f" uid={NOBODY} " in ln for ln in renewed), renewed


def test_refresh_spends_the_owners_budget(
    kms_backend: tuple[KmsEmulator, KmsProxy, str], session_keyring: object
) -> None:
    # No host cache: every renewal is a Decrypt, on the key owner's bucket (refilled once in
    # ~17 min): nobody's tokens go down by one per renewal, root's bucket is never touched.
    emulator, proxy, key_arn = kms_backend
    with installed(
        emulator, proxy, key_arn, host_cache=False, kms_rate_per_uid=0.001, kms_burst_per_uid=10
    ) as install:
        name = unique("aheadbudget")
        install.deploy(name, install.blob(b"kmst-ahead-budget", name))

        def read() -> list[object]:
            key = Key.request(install.description(name), b"")
            return [key.serial, key.read().decode()]

        with Steps(NOBODY, [read]) as child:
            assert child.ready() == {"ok": None}
            first = child.run(0)
            assert isinstance(first, dict) and first["ok"][1] == "kmst-ahead-budget", first
            serial = first["ok"][0]
            assert recorded(install, NOBODY, serial) == [serial]
            before, calls = bucket_tokens(install, NOBODY), proxy.count("Decrypt")
            assert before is not None
            for round_ in (1, 2):
                done = refresh_once(install)
                assert list(done) == [serial] and done[serial].startswith("renewed (ttl "), done
                assert proxy.count("Decrypt") == calls + round_
                tokens = bucket_tokens(install, NOBODY)
                assert (
                    tokens is not None and before - round_ - 0.1 < tokens <= before - round_ + 0.1
                )
            assert bucket_tokens(install, 0) is None
            assert child.run(0) == {"ok": [serial, "kmst-ahead-budget"]}


def test_refused_and_gone_names_are_not_renewed(
    kms_backend: tuple[KmsEmulator, KmsProxy, str], session_keyring: object
) -> None:
    emulator, proxy, key_arn = kms_backend
    refused, removed = unique("aheadrefused"), unique("aheadgone")
    policy = f'\n[names."{refused}"]\nallow_users = ["nobody"]\n'
    with installed(emulator, proxy, key_arn, host_cache=False) as install:
        keys: dict[str, Key] = {}
        for name in (refused, removed):
            install.deploy(name, install.blob(f"kmst-{name}".encode(), name))
            keys[name] = Key.request(install.description(name), b"")
        install.log.drain()
        # Policy now refuses root the first name; the second one's blob is withdrawn.
        original = install.config.read_text()
        install.config.write_text(original + policy)
        (install.blob_dir / f"{removed}.kms").unlink()
        calls = proxy.count("Decrypt")
        try:
            done = refresh_once(install)
        finally:
            install.config.write_text(original)
        assert done[keys[refused].serial].startswith("not renewed, it expires as it would have")
        assert done[keys[removed].serial].startswith("not renewed, it expires as it would have")
        assert proxy.count("Decrypt") == calls  # refused and unknown before any KMS call
        lines = install.log.drain()
        assert any(f" name={refused} " in ln and " outcome=refused " in ln for ln in lines), lines
        assert any(f" name={removed} " in ln and " outcome=unknown " in ln for ln in lines), lines
        # Forgotten: the keys keep their value until they expire, as without refresh-ahead.
        assert records(install, 0) == []
        assert refresh_once(install) == {}
        assert keys[refused].read() == f"kmst-{refused}".encode()


def test_a_key_whose_keyring_is_gone_is_forgotten_without_a_call(
    kms_backend: tuple[KmsEmulator, KmsProxy, str], session_keyring: object
) -> None:
    emulator, proxy, key_arn = kms_backend
    with installed(emulator, proxy, key_arn, host_cache=False) as install:
        name = unique("aheadkeyring")
        install.deploy(name, install.blob(b"kmst-ahead-keyring", name))
        # A cron job: its own session keyring, gone when it exits.
        job = as_user("root", lambda: Key.request(install.description(name), b"").serial)
        assert isinstance(job, dict) and "ok" in job, job
        serial = job["ok"]
        assert recorded(install, 0, serial) == [serial]
        _wait_gone(serial)
        calls = proxy.count("Decrypt")
        assert refresh_once(install) == {serial: _GONE}
        assert proxy.count("Decrypt") == calls
        assert records(install, 0) == []


_GONE = "forgotten: the key is gone (its keyring, expiry or a flush)"


def _wait_gone(serial: int) -> None:
    """Until the key GC has destroyed the key of a dead keyring (milliseconds)."""
    end = time.monotonic() + 5
    while time.monotonic() < end:
        try:
            Key(serial).describe()
        except KeyNotFoundError:
            return
        except KmsKeysError:
            return  # expired or revoked: as good as gone
        time.sleep(0.01)
    raise AssertionError(f"key {serial} outlived its keyring")


def test_a_redeployed_blob_reaches_the_key_in_place(fresh: Install) -> None:
    name = unique("aheadredeploy")
    fresh.deploy(name, fresh.blob(b"kmst-v1", name))
    key = Key.request(fresh.description(name), b"")
    assert key.read() == b"kmst-v1"
    fresh.deploy(name, fresh.blob(b"kmst-v2", name))
    done = refresh_once(fresh)
    assert done[key.serial].startswith("renewed (ttl "), done
    assert Key.request(fresh.description(name), b"").serial == key.serial
    assert key.read() == b"kmst-v2"
