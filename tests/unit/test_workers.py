"""The resolver daemon's warm threads (resolver/workers.py): reused, never shared at once."""

from __future__ import annotations

import threading
import time

import pytest

from resolver.workers import Workers

pytestmark = pytest.mark.unit


def _wait_for(condition: object, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_a_finished_thread_takes_the_next_work() -> None:
    workers = Workers("kmst-workers", idle=5.0)
    ran: list[int] = []
    workers.submit(lambda: ran.append(threading.get_ident()))
    _wait_for(lambda: workers.waiting == 1)
    workers.submit(lambda: ran.append(threading.get_ident()))
    _wait_for(lambda: len(ran) == 2 and workers.waiting == 1)
    assert ran[0] == ran[1]


def test_no_work_waits_for_another() -> None:
    workers = Workers("kmst-workers", idle=5.0)
    release = threading.Event()
    started = threading.Barrier(9, timeout=5)
    for _ in range(8):
        # Each blocks until all eight run at once: one thread each, none queued behind another.
        workers.submit(lambda: (started.wait(), release.wait(5)))
    started.wait()
    release.set()
    _wait_for(lambda: workers.waiting == 8)


def test_an_idle_thread_leaves() -> None:
    workers = Workers("kmst-workers", idle=0.05)
    done = threading.Event()
    workers.submit(done.set)
    assert done.wait(5)
    _wait_for(lambda: workers.waiting == 0)
    before = threading.active_count()
    time.sleep(0.2)
    assert threading.active_count() <= before
