"""The way through the host cache (resolver/cachedfetch.py), each branch on its own: a cache in
a dict, a refresh that answers, fails, refuses or hangs, and the thread runner of a long-running
process. The real keyring, the real upcall and a hung KMS are tests/faults/test_stale_wait.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from resolver.backend import Context, Request, Result
from resolver.background import BACKGROUND_PER_UID
from resolver.cachedfetch import Refresh, Through
from resolver.config import Config, parse
from resolver.errors import RefusedError, ServiceUnavailableError, UnavailableError
from resolver.hostcache import Entry, Kept, RefreshLock
from resolver.limits import BACKGROUND_PREFIX, acquire_slot
from tests.backends.contract import MemoryBudget

pytestmark = pytest.mark.unit

DESC = "kmskeys-hc:kms:app:digest"
STALE_WAIT = 0.3


class AgedCache:
    """A host cache in a dict whose entries have the age the test gives them."""

    def __init__(self, age: float | None, held: bool = True) -> None:
        self.entry = None if age is None else Entry(1, b"old", age)
        self.held = held
        self.stored: list[bytes] = []
        self.purged = 0
        self.changed = threading.Event()

    def lookup(self, desc: str) -> Entry | None:
        return self.entry

    def store(
        self, desc: str, plaintext: bytes, lifetime: int, *, uid: int, epoch: bytes = bytes(8)
    ) -> Kept:
        self.stored.append(plaintext)
        self.entry = Entry(1, plaintext, 0.0, epoch)
        self.changed.set()
        return Kept(True)

    def purge(self, desc: str) -> None:
        self.purged += 1
        self.entry = None
        self.changed.set()

    def lock(self, state_dir: Path, desc: str, wait: float) -> RefreshLock:
        return RefreshLock(-1, self.held)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return parse(
        {"ttl": 10, "stale_grace": 60, "stale_ttl": 5, "stale_wait": STALE_WAIT,
         "state_dir": str(tmp_path / "state")}
    )  # fmt: skip


def _fetch(config: Config, cache: AgedCache, refresh: Refresh) -> tuple[Result, Context]:
    request = Request("kms", "app", 1000, 1000, "someone")
    context = Context(time.monotonic() + 5, MemoryBudget())
    through = Through(config, cache, DESC, refresh, request=request)
    return through.fetch(context), context


def _never(context: Context) -> bytes:
    raise AssertionError("the service was asked")


def test_a_fresh_entry_answers_without_the_service(config: Config) -> None:
    result, context = _fetch(config, AgedCache(age=3.0), _never)
    assert result.payload == b"old" and not result.stale
    assert context.notes["source"] == "hostcache"


def test_no_stale_entry_refreshes_inline_and_keeps_it(config: Config) -> None:
    cache = AgedCache(age=None)
    result, _ = _fetch(config, cache, lambda context: b"new")
    assert result.payload == b"new" and cache.stored == [b"new"]


def test_a_fast_failure_is_answered_stale(config: Config) -> None:
    def down(context: Context) -> bytes:
        raise ServiceUnavailableError("KMS unreachable")

    result, context = _fetch(config, AgedCache(age=20.0), down)
    assert (result.payload, result.stale, result.ttl) == (b"old", True, 5)
    assert context.notes["reason"] == "KMS unreachable"


def test_a_refusal_is_never_masked_and_purges(config: Config) -> None:
    cache = AgedCache(age=20.0)

    def refused(context: Context) -> bytes:
        raise RefusedError("KMS AccessDeniedException")

    with pytest.raises(RefusedError):
        _fetch(config, cache, refused)
    assert cache.purged == 1


def test_a_uid_over_its_rate_gets_no_stale_answer(config: Config) -> None:
    def over(context: Context) -> bytes:
        raise UnavailableError("uid 1000 is over its KMS call rate")

    with pytest.raises(UnavailableError) as raised:
        _fetch(config, AgedCache(age=20.0), over)
    assert not isinstance(raised.value, ServiceUnavailableError)


def test_a_slow_service_is_answered_stale_then_refilled_in_the_background(
    config: Config,
) -> None:
    cache = AgedCache(age=20.0)
    release = threading.Event()

    def slow(context: Context) -> bytes:
        release.wait(10)
        return b"new"

    started = time.monotonic()
    result, context = _fetch(config, cache, slow)
    assert time.monotonic() - started >= STALE_WAIT
    assert (result.payload, result.stale) == (b"old", True)
    assert "did not answer within stale_wait 0.3 s" in context.notes["reason"]
    assert cache.stored == []
    release.set()  # the service answers: the thread keeps the answer
    assert cache.changed.wait(10) and cache.stored == [b"new"]


def test_another_refresh_under_way_is_answered_stale_without_a_call(config: Config) -> None:
    result, context = _fetch(config, AgedCache(age=20.0, held=False), _never)
    assert result.stale and "another request is refreshing it" in context.notes["reason"]


def test_background_slots_bound_a_uid(config: Config) -> None:
    taken = [
        acquire_slot(config.state_dir, 1000, BACKGROUND_PER_UID, BACKGROUND_PREFIX)
        for _ in range(BACKGROUND_PER_UID)
    ]
    try:
        assert all(fd is not None for fd in taken)
        result, context = _fetch(config, AgedCache(age=20.0), _never)
        assert result.stale
        assert f"has {BACKGROUND_PER_UID} background refreshes running" in context.notes["reason"]
    finally:
        for fd in taken:
            if fd is not None:
                os.close(fd)
