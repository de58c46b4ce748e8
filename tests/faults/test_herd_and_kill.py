"""KMS failing under a herd of waiters, and a resolver SIGKILLed mid-request.

Kernel facts relied on: concurrent requesters of a key under construction share one upcall and
wake when it is answered; a request-key program that exits without answering leaves the key
negated by the kernel itself (ENOKEY, for the kernel's fixed key_negative_timeout of 60 s), which
is why the handler's worker runs under a supervising parent that answers for it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kmskeys import (
    KeyRejectedError,
    TemporarilyUnavailableError,
)
from tests.faults.conftest import DEADLINE
from tests.support.kms_proxy import DROP, ProxiedRequest, kms_error
from tests.support.names import unique
from tests.upcall.harness import Install, handler_pids, installed, worker_pids

pytestmark = pytest.mark.faults

HERD = 100


def _herd(request: Callable[[], bytes], size: int) -> list[tuple[float, object]]:
    """Run `request` in `size` threads released together; (seconds, result or error) each."""
    barrier = threading.Barrier(size)
    results: list[tuple[float, object]] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        start = time.monotonic()
        try:
            outcome: object = request()
        except BaseException as exc:
            outcome = exc
        with lock:
            results.append((time.monotonic() - start, outcome))

    threads = [threading.Thread(target=worker) for _ in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DEADLINE + 30)
    assert not any(t.is_alive() for t in threads), "requesters still blocked"
    return results


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (lambda: kms_error("AccessDeniedException", 400), KeyRejectedError),
        (lambda: kms_error("ThrottlingException", 400), TemporarilyUnavailableError),
        (None, TemporarilyUnavailableError),  # KMS hangs past the deadline
    ],
    ids=["refused", "throttled", "hang"],
)
def test_herd_of_cold_callers_all_get_the_same_error_promptly(
    faulty: Install, fault: Callable[[], object] | None, error: type[Exception]
) -> None:
    assert faulty.proxy is not None
    name = unique("herd")
    text = faulty.blob(b"kmst-herd-secret", name)

    def hook(request: ProxiedRequest) -> object:
        if request.operation != "Decrypt":
            return None
        # Hold every answer back long enough for the whole herd to queue on the one key.
        time.sleep(0.5 if fault is not None else DEADLINE + 3)
        return fault() if fault is not None else None

    faulty.proxy.set_fault(hook)
    results = _herd(lambda: faulty.get(name, text), HERD)
    assert len(results) == HERD
    assert {type(outcome) for _, outcome in results} == {error}
    slowest = max(seconds for seconds, _ in results)
    assert slowest < DEADLINE + 1, slowest
    runs = [line for line in faulty.log.drain() if f" name={name} " in line]
    # The herd shares the upcall; an EAGAIN key counts as absent, so a thread that arrives
    # after the answer starts a new run, but a herd never becomes one run per caller.
    assert 1 <= len(runs) <= HERD // 10, len(runs)
    if error is KeyRejectedError:
        # The refusal stays cached for at least negative_ttl - 1 s (whole-second expiry), far
        # longer than the herd takes to arrive: every latecomer gets it from the kernel.
        assert len(runs) == 1


def _stalled_callers(
    faulty: Install, name: str, text: str, count: int
) -> tuple[list[threading.Thread], list[object], threading.Event]:
    """`count` callers waiting on one upcall whose KMS call hangs; the event releases the hang."""
    assert faulty.proxy is not None
    arrived, release = threading.Event(), threading.Event()

    def stall(request: ProxiedRequest) -> object:
        if request.operation != "Decrypt":
            return None
        arrived.set()
        release.wait(30)
        return DROP

    faulty.proxy.set_fault(stall)
    results: list[object] = []

    def caller() -> None:
        try:
            results.append(faulty.get(name, text))
        except BaseException as exc:
            results.append(exc)

    callers = [threading.Thread(target=caller) for _ in range(count)]
    for thread in callers:
        thread.start()
    assert arrived.wait(DEADLINE), "the resolver never called KMS"
    return callers, results, release


@pytest.fixture
def handled(faulty: Install) -> Iterator[Install]:
    """The tier's install, or one like it without the resolver daemon: the handler's worker is
    what these tests kill (the daemon's own faults: tests/faults/test_daemon_faults.py)."""
    if faulty.daemon is None:
        yield faulty
        return
    settings = {k: v for k, v in faulty.settings.items() if k in KEPT}
    with installed(faulty.emulator, faulty.proxy, faulty.key_arn, daemon=False, **settings) as it:
        yield it


KEPT = ("deadline", "negative_ttl", "kms_rate_per_uid", "kms_burst_per_uid")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stuck_worker_still_gets_the_key_answered(handled: Install, sig: int) -> None:
    faulty = handled
    # SIGKILL: the worker dies without a word. SIGSTOP: it can no longer run its own watchdog.
    # Either way the supervising parent answers EAGAIN (never cached) within deadline + 1 s.
    name = unique("killed")
    secret = b"kmst-killed-" + os.urandom(8).hex().encode()
    text = faulty.blob(secret, name)
    callers, results, release = _stalled_callers(faulty, name, text, 5)
    try:
        (worker,) = worker_pids(faulty.config)
        hit = time.monotonic()
        os.kill(worker, sig)
        for thread in callers:
            thread.join(timeout=DEADLINE + 5)
        released = time.monotonic() - hit
    finally:
        release.set()
    assert not any(t.is_alive() for t in callers), "callers still blocked"
    assert released < DEADLINE + 1, released
    assert [type(r) for r in results] == [TemporarilyUnavailableError] * 5, results
    assert handler_pids(faulty.config) == []
    line = faulty.log.wait_for(name)
    expected = "killed by signal SIGKILL" if sig == signal.SIGKILL else "killed past its deadline"
    assert "outcome=unavailable" in line and expected in line, line
    # EAGAIN is not cached: with KMS back, the very next request resolves; no flush, no 60 s.
    assert faulty.proxy is not None
    faulty.proxy.set_fault(None)
    assert faulty.get(name, text) == secret
    assert secret.decode() not in "".join(faulty.log.drain())
