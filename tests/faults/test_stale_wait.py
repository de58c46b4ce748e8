"""Stale answers without the stall (issue 26.14): with KMS hung and a stale host-cache entry at
hand, a miss waits for KMS at most `stale_wait`, is answered stale, and the refresh goes on in
a detached child (the handler) or a thread (the resolver daemon, which never forks) that fills
the host cache when KMS comes back. Each test runs with the handler and with the daemon.

How the bound is asserted without timing the test machine: the handler's own `ms=` field (from
its start to the answer) must be at least `stale_wait` (it did wait for KMS) and well below the
`deadline` a hung KMS would otherwise cost (the window between them is seconds wide, so load
cannot move a result across it); and the outcome says which path answered.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator

import pytest

from kmskeys import Key, Keyring
from kmskeys.blob import parse_blob
from kmskeys.contract import hostcache_entry
from resolver.background import BACKGROUND_PER_UID
from resolver.hostcache import stripe_of
from tests.faults.conftest import NEGATIVE_TTL
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy, ProxiedRequest
from tests.support.names import unique
from tests.support.ttl import MIN_TTL
from tests.upcall.harness import Install, installed
from tests.upcall.refreshing import purge_host_cache

pytestmark = pytest.mark.faults

TTL = MIN_TTL
DEADLINE = 10.0
STALE_WAIT = 1.0
# The handler's start, imports and config, on a loaded machine: far below DEADLINE - STALE_WAIT.
SLACK_MS = 4000.0
HANG = 30.0  # a hung Decrypt is held this long at most (the test releases it sooner)


@pytest.fixture(scope="module", params=[False, True], ids=["handler", "daemon"])
def waiting(
    request: pytest.FixtureRequest, fault_backend: tuple[KmsEmulator, KmsProxy, str]
) -> Iterator[Install]:
    """An install whose entries turn stale after 3 s, with a long deadline and a short wait;
    its misses answered by the handler, or by the resolver daemon."""
    emulator, proxy, key_arn = fault_backend
    with installed(
        emulator,
        proxy,
        key_arn,
        daemon=request.param,
        deadline=DEADLINE,
        negative_ttl=NEGATIVE_TTL,
        ttl=TTL,
        stale_grace=120,
        stale_ttl=MIN_TTL,
        stale_wait=STALE_WAIT,
        # One handler at a time per uid: a background child that kept the requester's slot
        # would make the next request of the uid EAGAIN.
        max_concurrent_per_uid=1,
        kms_rate_per_uid=1000,
        kms_burst_per_uid=100000,
    ) as install:
        try:
            yield install
        finally:
            purge_host_cache(install.prefix)


@pytest.fixture
def hung(waiting: Install, session_keyring: object) -> Iterator[tuple[Install, set[str]]]:
    """The install, and the names whose Decrypt hangs until the test empties the set (KMS
    comes back) or HANG passes; every held request is released at the end."""
    assert waiting.proxy is not None
    names: set[str] = set()
    back = threading.Event()

    def hook(request: ProxiedRequest) -> None:
        if request.operation == "Decrypt" and any(n.encode() in request.body for n in names):
            end = time.monotonic() + HANG
            while names and not back.is_set() and time.monotonic() < end:
                time.sleep(0.02)
        # then forwarded: KMS answers

    waiting.proxy.reset_counts()
    waiting.log.drain()
    waiting.proxy.set_fault(hook)
    try:
        yield waiting, names
    finally:
        back.set()
        waiting.proxy.set_fault(None)


def _ask(install: Install, name: str, blob: str) -> bytes:
    Keyring.join_session()  # another service: a keyring of its own, a miss of its own
    return Key.request(install.description(name), blob).read()


def _ms(line: str) -> float:
    found = re.search(r" ms=(\d+)", line)
    assert found, line
    return float(found.group(1))


def _blobs(install: Install, names: list[str]) -> dict[str, str]:
    return {name: install.blob(f"kmst-{name}".encode(), name) for name in names}


def _cached_past_ttl(install: Install, blobs: dict[str, str]) -> dict[str, str]:
    """Each blob decrypted once (its host-cache entry made), then aged past ttl."""
    for name, blob in blobs.items():
        assert _ask(install, name, blob) == f"kmst-{name}".encode()
        assert " outcome=ok " in install.log.wait_for(name)
    time.sleep(TTL + 0.2)
    return blobs


def test_hung_kms_is_answered_stale_within_stale_wait_then_refilled(
    hung: tuple[Install, set[str]],
) -> None:
    install, names = hung
    assert install.proxy is not None
    name = unique("stalewait")
    blob = _cached_past_ttl(install, _blobs(install, [name]))[name]
    install.proxy.reset_counts()
    names.add(name)  # KMS hangs from now on

    assert _ask(install, name, blob) == f"kmst-{name}".encode()
    line = install.log.wait_for(name)
    assert " outcome=stale " in line and " source=hostcache " in line, line
    assert f"did not answer within stale_wait {STALE_WAIT:g} s" in line, line
    assert STALE_WAIT * 1000 <= _ms(line) < STALE_WAIT * 1000 + SLACK_MS < DEADLINE * 1000, line

    # Other keyrings meanwhile: stale as fast, and KMS is not asked again (the background
    # refresh holds the entry's lock: one per name, however many keyrings miss); admitted at
    # all because the background child does not hold the uid's one handler slot.
    for _ in range(2):
        assert _ask(install, name, blob) == f"kmst-{name}".encode()
        line = install.log.wait_for(name)
        assert " outcome=stale " in line and "another request is refreshing it" in line, line
        assert _ms(line) < STALE_WAIT * 1000 + SLACK_MS, line
    assert install.proxy.count("Decrypt") == 1

    names.clear()  # KMS comes back: the held Decrypt is answered, in the background child
    line = install.log.wait_for(name)
    assert " outcome=ok " in line and " source=background " in line, line
    # The host cache holds a fresh entry now: the next miss is a hit, with no KMS call.
    assert _ask(install, name, blob) == f"kmst-{name}".encode()
    line = install.log.wait_for(name)
    assert " outcome=ok " in line and " source=hostcache " in line, line
    assert install.proxy.count("Decrypt") == 1


def test_background_refreshes_are_bounded_per_uid(hung: tuple[Install, set[str]]) -> None:
    install, names = hung
    assert install.proxy is not None
    blobs = _cached_past_ttl(install, _on_distinct_stripes(install, BACKGROUND_PER_UID + 1))
    chosen = list(blobs)
    install.proxy.reset_counts()
    names.update(chosen)
    lines = []
    for name in chosen:
        assert _ask(install, name, blobs[name]) == f"kmst-{name}".encode()
        lines.append(install.log.wait_for(name))
    assert all(" outcome=stale " in line for line in lines), lines
    # The uid's background slots are taken: the last name is answered stale without a wait
    # and without a KMS call; it is asked again after its stale_ttl.
    assert f"has {BACKGROUND_PER_UID} background refreshes running already" in lines[-1]
    assert _ms(lines[-1]) < STALE_WAIT * 1000, lines[-1]
    assert install.proxy.count("Decrypt") == BACKGROUND_PER_UID
    names.clear()
    for name in chosen[:-1]:
        assert " source=background " in install.log.wait_for(name)


def _on_distinct_stripes(install: Install, count: int) -> dict[str, str]:
    """Names and blobs whose entries take different refresh locks (a shared stripe would hold
    one up)."""
    chosen: dict[int, tuple[str, str]] = {}
    while len(chosen) < count:
        name = unique("stalebound")
        text = install.blob(f"kmst-{name}".encode(), name)
        digest = hashlib.blake2b(parse_blob(text).identity().encode(), digest_size=32).hexdigest()
        stripe = stripe_of(hostcache_entry(install.prefix, name, None, digest))
        chosen.setdefault(stripe, (name, text))
    return dict(chosen.values())
