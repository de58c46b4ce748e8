"""What the daemon-path tests share (tests/upcall/test_daemon*.py): reading a resolver log line
(its phases, its writer), the daemon's socket, a miss from a new session keyring, and the
negative key a refusal leaves. The `served` install is a fixture of tests/upcall/conftest.py.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kmskeys import Key, KeyNotFoundError, Keyring
from kmskeys.cached import cached_failure
from tests.upcall.harness import Install

# How long a gate waits for the daemon before it falls back (the `served` install's setting).
DAEMON_WAIT = 0.3


def phases(line: str) -> set[str]:
    """The timing phases named in a resolver log line's t= field."""
    field = next(part for part in line.split() if part.startswith("t="))
    return {item.split(":")[0] for item in field[2:].split(",")}


def writer(line: str) -> int:
    """The pid that wrote a resolver log line (`kmskeys-resolver[PID]:`)."""
    found = re.search(r"kmskeys-resolver\[(\d+)\]:", line)
    assert found, line
    return int(found.group(1))


def socket_of(install: Install) -> Path:
    return Path(install.settings["warm_socket"])


def fresh_payload(install: Install, name: str, blob: str | None) -> bytes:
    """The payload of `name` requested from a new session keyring (a miss, unless host-cached)."""
    Keyring.join_session()
    return Key.request(install.description(name), blob if blob is not None else b"").read()


def refused_key(install: Install, name: str) -> tuple[int, int, int]:
    """The (uid, gid, perm) of the negative key a refusal of `name` leaves in a new session."""
    Keyring.join_session()
    with pytest.raises(KeyNotFoundError):
        Key.request(install.description(name), b"")
    negative = cached_failure(install.description(name))
    assert negative is not None, name
    return negative.uid, negative.gid, negative.perm


@contextmanager
def fake_daemon(path: Path, serve: Callable[[socket.socket], None]) -> Iterator[None]:
    """A listener of root's at `path` (the real daemon stopped) that treats each gate with
    `serve` in a thread."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    listener.bind(os.fspath(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=5)
        path.unlink(missing_ok=True)


def stop_daemon(install: Install) -> None:
    """Stop the install's resolver daemon (the gate then finds no one at its socket)."""
    assert install.daemon is not None
    install.daemon.terminate()
    install.daemon.wait(timeout=20)
