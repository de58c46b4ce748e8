"""KMS failing under a herd of waiters, and a resolver SIGKILLed mid-request.

Kernel facts relied on: concurrent requesters of a key under construction share one upcall and
wake when it is answered; a handler that dies without answering leaves the key negated by the
kernel itself (ENOKEY, for the kernel's key_negative_timeout of 60 s).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from kmskeys import (
    KeyNotFoundError,
    KeyRejectedError,
    TemporarilyUnavailableError,
    cli,
)
from tests.faults.conftest import DEADLINE
from tests.support.kms_proxy import DROP, ProxiedRequest, kms_error
from tests.support.names import unique
from tests.upcall.harness import Install, handler_pids

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
        assert len(runs) == 1


def test_sigkilled_resolver_releases_its_callers_with_enokey(faulty: Install) -> None:
    assert faulty.proxy is not None
    name = unique("killed")
    secret = b"kmst-killed-" + os.urandom(8).hex().encode()
    text = faulty.blob(secret, name)
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

    callers = [threading.Thread(target=caller) for _ in range(5)]
    for thread in callers:
        thread.start()
    try:
        assert arrived.wait(DEADLINE), "the resolver never called KMS"
        (pid,) = handler_pids(faulty.config)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        for thread in callers:
            thread.join(timeout=10)
        released = time.monotonic() - killed
    finally:
        release.set()
    assert not any(t.is_alive() for t in callers), "callers still blocked after SIGKILL"
    assert released < 1, released
    # No answer was given: the kernel negates the key itself, and every waiter sees ENOKEY.
    assert [type(r) for r in results] == [KeyNotFoundError] * 5, results
    faulty.proxy.set_fault(None)
    # That negative key stays for the kernel's 60 s: no new upcall until it is flushed.
    with pytest.raises(KeyNotFoundError):
        faulty.get(name, text)
    assert handler_pids(faulty.config) == []
    assert cli.main(["flush", name, "--prefix", faulty.prefix]) == 0
    assert faulty.get(name, text) == secret
    # The killed run never logged; the one after the flush did, once.
    lines = [line for line in faulty.log.drain() if f" name={name} " in line]
    assert len(lines) == 1 and "outcome=ok" in lines[0], lines
