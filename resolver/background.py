"""Finishing a host-cache refresh after the request was answered stale (docs/resolver.md,
"Stale without the stall").

A request that has a stale host-cache entry at hand waits for KMS at most `stale_wait`, then is
answered stale; the refresh must go on and fill the host cache when KMS answers. Where that goes
on depends on the process:

- the request-key handler must exit for the requester that started the upcall to wake up
  (UMH_WAIT_PROC), so a thread of its would die with it: it forks a detached child (ForkRunner)
  that finishes the refresh and exits by the request's deadline. The child keeps the entry's
  refresh lock (one refresh per entry) and one of its uid's background slots (at most
  BACKGROUND_PER_UID per charged uid), and nothing else: no handler slot, no authority;
- a long-running process (the refresher, the resolver daemon, prefetch) uses a thread
  (ThreadRunner), bounded the same way by the same lock and slot files.

`use_fork()` selects the first; the handler's worker calls it, every other process gets threads.
A task never raises: it returns a Finished, carried back to the waiting request (through a pipe
from a child: the plaintext passes root to root through kernel memory, as it does through the
resolver daemon's socket to the gate).
"""

from __future__ import annotations

import os
import select
import signal
import struct
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from types import FrameType
from typing import Protocol

from resolver.errors import (
    ConfigError,
    DeadlineExceeded,
    RefusedError,
    ResolverError,
    ServiceUnavailableError,
    UnavailableError,
    UnknownSecretError,
)

# Background refreshes one (charged) uid may have running at once: a hung KMS must not pile up
# processes, and these never take the handler slots its requests need (limits.BACKGROUND_PREFIX).
BACKGROUND_PER_UID = 2
_KINDS: dict[str, type[ResolverError]] = {
    "unknown": UnknownSecretError,
    "refused": RefusedError,
    "config": ConfigError,
    "service": ServiceUnavailableError,
    "unavailable": UnavailableError,
}
_HEAD = struct.Struct("!III")  # lengths of kind, text, payload


class Finished:
    """What a refresh came to: the payload, or the error; the phases it spent (ms) and a
    note about the host cache (why the entry was not kept), for the request's log line."""

    __slots__ = ("error", "note", "payload", "phases")

    def __init__(
        self,
        payload: bytes = b"",
        error: ResolverError | None = None,
        phases: dict[str, float] | None = None,
        note: str = "",
    ) -> None:
        self.payload = payload
        self.error = error
        self.phases = phases or {}
        self.note = note

    def __repr__(self) -> str:  # never the payload
        return f"Finished({len(self.payload)} bytes, error={self.error!r})"

    def encode(self) -> bytes:
        """The bytes a child sends back."""
        error = self.error
        kind = "" if error is None else _kind(error)
        phases = ",".join(f"{k}={v:.3f}" for k, v in self.phases.items())
        text = "\0".join((error.reason if error else "", self.note, phases)).encode()
        return (
            _HEAD.pack(len(kind), len(text), len(self.payload))
            + kind.encode()
            + text
            + (self.payload)
        )

    @classmethod
    def decode(cls, data: bytes) -> Finished:
        """The Finished a child sent; ValueError if it is not one."""
        kind_len, text_len, payload_len = _HEAD.unpack_from(data)
        if len(data) != _HEAD.size + kind_len + text_len + payload_len:
            raise ValueError("truncated")
        at = _HEAD.size
        kind = data[at : at + kind_len].decode()
        reason, note, phases = data[at + kind_len : at + kind_len + text_len].decode().split("\0")
        spent = dict(item.split("=") for item in phases.split(",") if item)
        error = _KINDS[kind](reason) if kind else None
        payload = data[at + kind_len + text_len :]
        return cls(payload, error, {k: float(v) for k, v in spent.items()}, note)


def _kind(error: ResolverError) -> str:
    # Most derived first: ServiceUnavailableError is an UnavailableError, ConfigError a refusal.
    for kind in ("service", "config", "unknown", "refused", "unavailable"):
        if isinstance(error, _KINDS[kind]):
            return kind
    return "refused"


Task = Callable[[], Finished]


class Pending(Protocol):
    """A task started apart; `wait` gives its Finished, or None if it is still running."""

    def wait(self, timeout: float) -> Finished | None:
        """Wait up to `timeout` s for the task."""
        ...


class Runner(Protocol):
    """Where a task runs apart from the request."""

    def start(self, task: Task, owned: Sequence[int], deadline: float) -> Pending:
        """Run `task`, which owns the fds `owned` (closed when it ends) and must end by
        `deadline` (time.monotonic())."""
        ...


class _ThreadPending:
    def __init__(self) -> None:
        import threading

        self.done = threading.Event()
        self.result: Finished | None = None

    def wait(self, timeout: float) -> Finished | None:
        return self.result if self.done.wait(max(0.0, timeout)) else None


class ThreadRunner:
    """A thread of this long-running process; not a daemon thread, so a process that ends
    (prefetch) lets the refresh finish, within its deadline."""

    def start(self, task: Task, owned: Sequence[int], deadline: float) -> Pending:
        import threading

        pending = _ThreadPending()

        def run() -> None:
            try:
                pending.result = task()
            finally:
                close(owned)
                pending.done.set()

        threading.Thread(target=run, name="kmskeys-background-refresh").start()
        return pending


class _ForkPending:
    def __init__(self, read_end: int, pid: int) -> None:
        self.read_end = read_end
        self.pid = pid

    def wait(self, timeout: float) -> Finished | None:
        give_up = time.monotonic() + max(0.0, timeout)
        chunks: list[bytes] = []
        poller = select.poll()
        poller.register(self.read_end, select.POLLIN)
        try:
            while poller.poll(max(0.0, give_up - time.monotonic()) * 1000):
                chunk = os.read(self.read_end, 1 << 16)
                if not chunk:  # the child is done
                    with suppress(ChildProcessError):
                        os.waitpid(self.pid, os.WNOHANG)
                    return _decoded(b"".join(chunks))
                chunks.append(chunk)
            return None  # still running: it goes on, detached
        finally:
            os.close(self.read_end)


def _decoded(data: bytes) -> Finished:
    try:
        return Finished.decode(data)
    except (ValueError, KeyError, UnicodeDecodeError, struct.error):
        # The child died before it sent a whole answer (killed, out of memory).
        return Finished(error=ServiceUnavailableError("background refresh ended without answer"))


class ForkRunner:
    """A detached child process, for the request-key handler (see the module docstring)."""

    def start(self, task: Task, owned: Sequence[int], deadline: float) -> Pending:
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            close((read_end, write_end))
            raise
        if pid == 0:  # the child: never returns into the handler's code
            try:
                os.close(read_end)
                _detach(keep=(write_end, *owned))
                _arm(deadline)
                finished = task()
                with suppress(OSError):  # the request may have gone: nobody reads
                    os.write(write_end, finished.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        close(owned)  # the child holds the lock and the slot now
        return _ForkPending(read_end, pid)


def _detach(keep: Sequence[int]) -> None:
    """Leave the handler's session and every fd but `keep`: the request's slot (the child must
    not hold the requester's handler slot), sockets, and stdio (request-key's)."""
    os.setsid()
    with suppress(OSError):
        from kmskeys.keyutils import keyctl_assume_authority

        keyctl_assume_authority(0)  # no authority over the request's key
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with suppress(OSError):
                os.close(fd)


def _arm(deadline: float) -> None:
    """End the child by the request's deadline, whatever it waits on (timers are not
    inherited by fork: arm its own)."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise DeadlineExceeded

    signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, deadline - time.monotonic()))


def close(fds: Sequence[int]) -> None:
    """Close each of `fds`, ignoring those already closed."""
    for fd in fds:
        with suppress(OSError):
            os.close(fd)


# This process's runner: threads, unless use_fork() said otherwise.
_RUNNER: list[Runner] = [ThreadRunner()]


def use_fork() -> None:
    """This process is the request-key handler: background refreshes fork (module docstring)."""
    _RUNNER[0] = ForkRunner()


def runner() -> Runner:
    """The runner this process uses."""
    return _RUNNER[0]
