"""The requester's slot outlives no answer of the resolver daemon's: once kmskeys-gate has
answered a miss and exited (which is when the requester wakes up), the uid's slot is free,
whatever the daemon still does for that request (refresh-ahead's record, its log line).

A uid held to one request at a time (max_concurrent_per_uid = 1) that asks again at once must
be answered, not EAGAIN "already has 1 requests being resolved". The daemon once closed its
copy of the slot only after its log line: on a loaded host, the next miss of a sequential
requester now and then found the slot still held (resolver/daemon_request.py). Here the
daemon's log is jammed (its syslog socket full, then its stderr, a full pipe): its bookkeeping
after the answer blocks for as long as the test wants, so the race is a certainty.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.names import unique
from tests.support.resolver_daemon import socket_dir
from tests.upcall.daemonpath import fresh_payload
from tests.upcall.harness import RESOLVER, Install

pytestmark = pytest.mark.upcall

F_GETPIPE_SZ = 1032  # fcntl(2); Python's fcntl module names it from 3.10 on Linux only


@contextmanager
def jammed_syslog() -> Iterator[Path]:
    """A syslog socket whose queue is full: every line sent to it is refused (EAGAIN), and the
    resolver writes it to its stderr instead (resolver/log.py)."""
    where = Path(tempfile.mkdtemp(prefix=unique("jam") + "-"))
    path = where / "log.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(os.fspath(path))
    fillers: list[socket.socket] = []
    try:
        # Until a new sender is refused at once: the queue itself is full, not a sender's buffer.
        while True:
            sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            fillers.append(sender)
            sender.setblocking(False)
            sender.connect(os.fspath(path))
            try:
                sender.send(b"kmst-jam")
            except BlockingIOError:
                break
            while True:
                try:
                    sender.send(b"kmst-jam")
                except BlockingIOError:
                    break
        yield path
    finally:
        for sender in fillers:
            sender.close()
        listener.close()
        path.unlink(missing_ok=True)
        where.rmdir()


@contextmanager
def daemon_with_stderr(install: Install) -> Iterator[tuple[Callable[[str], None], bytearray]]:
    """`kmskeys-resolver serve` for `install`, its stderr a pipe of ours. Yields `jam()`, which
    fills that pipe once the line of a miss is out, so that the daemon's next write there blocks
    until the daemon is stopped; and what the daemon wrote there (all of it once stopped)."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [os.fspath(RESOLVER), "serve", "--config", os.fspath(install.config)], stderr=write_end
    )
    drained = threading.Event()
    said = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 1 << 16):
            said.extend(chunk)
        drained.set()

    def jam(after: str) -> None:
        """Once the line of `after`'s miss is out, fill the pipe."""
        until = time.monotonic() + 30
        while f" name={after} ".encode() not in said:
            assert time.monotonic() < until, f"no line for {after}: {said.decode()!r}"
            said.extend(os.read(read_end, 1 << 16))
        size = fcntl.fcntl(read_end, F_GETPIPE_SZ)
        os.set_blocking(read_end, False)  # the read end's own flags: the daemon's stay blocking
        try:
            while chunk := os.read(read_end, 1 << 16):
                said.extend(chunk)
        except BlockingIOError:
            pass
        os.set_blocking(read_end, True)
        os.write(write_end, b"#" * size)  # an empty pipe takes its size at once, then is full

    drainer = threading.Thread(target=drain, daemon=True)
    try:
        until = time.monotonic() + 30
        while b"listening on" not in said:
            assert proc.poll() is None, f"the resolver daemon exited: {said.decode()!r}"
            assert time.monotonic() < until, f"the daemon did not start: {said.decode()!r}"
            said.extend(os.read(read_end, 1 << 16))
        yield jam, said
    finally:
        os.close(write_end)
        drainer.start()  # lets every blocked write go on, so that the daemon can stop
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        drained.wait(timeout=10)
        os.close(read_end)


def test_a_uid_held_to_one_request_is_answered_again_at_once(
    extra_install: Callable[..., Any],
) -> None:
    with (
        socket_dir() as run,
        jammed_syslog() as log,
        extra_install(
            daemon=False,  # started below, its stderr ours
            warm_socket=run / "resolver.sock",
            syslog_socket=log,
            max_concurrent_per_uid=1,
            deadline=10,
            kms_rate_per_uid=1000,
            kms_burst_per_uid=100000,
        ) as install,
        daemon_with_stderr(install) as (jam, said),
    ):
        assert install.proxy is not None
        names = [unique("oneslot") for _ in range(3)]
        blobs = {name: install.blob(f"kmst-{name}".encode(), name) for name in names}
        # A first miss with the log still flowing (to stderr): the daemon's first KMS call.
        assert fresh_payload(install, names[0], blobs[names[0]]) == f"kmst-{names[0]}".encode()
        jam(names[0])
        install.proxy.reset_counts()
        # The daemon answers, then blocks writing this miss's line: its thread never ends.
        assert fresh_payload(install, names[1], blobs[names[1]]) == f"kmst-{names[1]}".encode()
        # The same uid at once: its one slot must be free (the gate that held it has exited).
        assert fresh_payload(install, names[2], blobs[names[2]]) == f"kmst-{names[2]}".encode()
        assert install.proxy.count("Decrypt") == 2
    # The jam held: the second miss's line went to the full pipe (and waited there).
    assert f" name={names[1]} ".encode() in said, said[-2000:]
