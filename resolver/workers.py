"""The resolver daemon's threads: kept warm between misses, one per request in flight.

Starting a thread costs a miss its clone() and a handshake (Thread.start waits until the new
thread runs, which on a busy host is a scheduling round: measured 0.3-1.5 ms, twice a miss). So
a thread that finished its work waits up to IDLE seconds for the next one; a miss that finds no
idle thread starts one, as before. No request ever waits for another's thread: the count of
threads is the count of work in flight (resolver/daemon.py MAX_ACTIVE bounds it), plus the
idle ones, which leave after IDLE seconds.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

IDLE = 60.0  # how long a thread with nothing to do stays for the next miss

Work = Callable[[], None]


class Workers:
    """Threads that run each submitted work at once, reusing an idle one when there is one."""

    def __init__(self, name: str, idle: float = IDLE) -> None:
        self.name, self.idle = name, idle
        self._jobs: queue.SimpleQueue[Work] = queue.SimpleQueue()
        # Threads waiting for work, less the work queued for them (changed under _lock only).
        self._waiting = 0
        self._lock = threading.Lock()

    def submit(self, work: Work) -> None:
        """Run `work` in a thread of its own now; RuntimeError if no thread can be had."""
        with self._lock:
            if self._waiting > 0:
                self._waiting -= 1
                self._jobs.put(work)
                return
        threading.Thread(target=self._serve, args=(work,), name=self.name, daemon=True).start()

    @property
    def waiting(self) -> int:
        """Idle threads."""
        return self._waiting

    def _serve(self, work: Work | None) -> None:
        while work is not None:
            work()  # the work answers its own failures: nothing escapes it but a bug
            work = self._next()

    def _next(self) -> Work | None:
        with self._lock:
            self._waiting += 1
        try:
            return self._jobs.get(timeout=self.idle)
        except queue.Empty:
            with self._lock:
                # A submit may have counted on this thread just as it timed out: its work is
                # queued by now (submit queues under the lock), so it is taken, never dropped.
                try:
                    return self._jobs.get_nowait()
                except queue.Empty:
                    self._waiting -= 1
                    return None
