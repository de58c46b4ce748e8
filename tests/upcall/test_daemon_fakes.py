"""The gate against daemons it must not believe, through the real upcall: one that accepts and
never answers, one whose answer or refusal mask the gate cannot accept, one that asks for the
view twice, an impostor of another uid, requests from anyone but root, malformed messages. Each
costs a bounded wait or falls back to the handler; none gets a key answered wrongly. (The daemon
path itself: test_daemon.py.)
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from kmskeys import TemporarilyUnavailableError
from kmskeys.contract import (
    ADMIN_NEGATIVE_KEY_PERM,
    NEGATIVE_KEY_PERM,
    RESOLVED_KEY_PERM,
)
from resolver import wire
from tests.support.names import unique
from tests.support.reach import reach_checkout
from tests.support.requester import NOBODY, as_user
from tests.upcall.daemonpath import fake_daemon, fresh_payload, refused_key, socket_of, stop_daemon
from tests.upcall.harness import Install

pytestmark = pytest.mark.upcall


def test_a_daemon_that_accepts_and_never_answers_is_a_bounded_eagain(served: Install) -> None:
    stop_daemon(served)
    conns: list[socket.socket] = []

    def accept_only(conn: socket.socket) -> None:
        conns.append(conn)  # kept open, never answered past ACCEPTED
        conn.recv(65536)
        conn.sendall(wire.header(wire.ACCEPTED, wire.ACCEPTED_BODY.pack(1500)))

    name = unique("silent")
    blob = served.blob(b"kmst-silent", name)
    with fake_daemon(socket_of(served), accept_only):
        start = time.monotonic()
        with pytest.raises(TemporarilyUnavailableError):
            fresh_payload(served, name, blob)
        took = time.monotonic() - start
    for conn in conns:
        conn.close()
    assert 1.5 <= took < 5, took
    line = served.log.wait_for(name)
    assert "outcome=unavailable" in line and "did not answer within 1500 ms" in line, line
    assert served.decrypts() == 0


def test_an_answer_the_gate_cannot_accept_falls_back_to_the_handler(served: Install) -> None:
    stop_daemon(served)
    name = unique("badanswer")
    blob = served.blob(b"kmst-real", name)

    def lie(conn: socket.socket) -> None:
        # For another uid, with a mask that gives others READ: refused by the gate.
        with conn:
            conn.recv(65536)
            conn.sendall(wire.header(wire.ACCEPTED, wire.ACCEPTED_BODY.pack(3000)))
            message = wire.outcome_message(
                0, uid=os.getuid() + 1, gid=0, perm=0x3F3F3F3F, negative_perm=0, timeout=60,
                negative_ttl=3, payload=b"kmst-poisoned",
            )  # fmt: skip
            conn.sendall(message)
            conn.recv(100)

    with fake_daemon(socket_of(served), lie):
        assert fresh_payload(served, name, blob) == b"kmst-real"
    lines = [served.log.wait_for(name), served.log.wait_for(name)]
    assert any("outcome=fallback" in x and "not one the gate accepts" in x for x in lines), lines
    assert any("outcome=ok" in x for x in lines), lines


def test_a_daemon_asking_for_the_view_twice_gets_it_once_then_the_handler_answers(
    served: Install,
) -> None:
    stop_daemon(served)
    name = unique("twiceview")
    blob = served.blob(b"kmst-real", name)
    views: list[int] = []

    def greedy(conn: socket.socket) -> None:
        # The wire has one VIEW_ASK per request: the gate answers the first and abandons at
        # the second (its /proc/keys read is not a thing to have on repeat), then falls back.
        with conn:
            wire.receive_request(conn)
            conn.sendall(wire.header(wire.ACCEPTED, wire.ACCEPTED_BODY.pack(3000)))
            for _ in range(2):
                conn.sendall(wire.header(wire.VIEW_ASK, b""))
                kind, _body = wire.read_message(conn, wire.VIEW_MAX)
                views.append(kind)

    with fake_daemon(socket_of(served), greedy):
        assert fresh_payload(served, name, blob) == b"kmst-real"
    assert views == [wire.VIEW, wire.ABANDON], views
    lines = [served.log.wait_for(name), served.log.wait_for(name)]
    assert any("outcome=fallback" in x and "not one the gate accepts" in x for x in lines), lines
    assert any("outcome=ok" in x for x in lines), lines


def test_a_refusal_whose_mask_gives_possessors_anything_falls_back_to_the_handler(
    served: Install,
) -> None:
    stop_daemon(served)
    name = unique("badrefusal")

    def lie(conn: socket.socket) -> None:
        # A refusal whose key possessors could write: a co-possessor's add_key would fill it.
        with conn:
            conn.recv(65536)
            conn.sendall(wire.header(wire.ACCEPTED, wire.ACCEPTED_BODY.pack(3000)))
            message = wire.outcome_message(
                errno.ENOKEY, uid=os.getuid(), gid=0, perm=0, negative_perm=0x3F010000,
                timeout=3, negative_ttl=3,
            )  # fmt: skip
            conn.sendall(message)
            conn.recv(100)

    with fake_daemon(socket_of(served), lie):
        assert refused_key(served, name)[2] in (NEGATIVE_KEY_PERM, ADMIN_NEGATIVE_KEY_PERM)
    lines = [served.log.wait_for(name), served.log.wait_for(name)]
    assert any("outcome=fallback" in x and "not one the gate accepts" in x for x in lines), lines
    assert any("outcome=unknown" in x for x in lines), lines


def _impostor(path: Path, ready: int) -> None:
    # Bound as root (the directory is root's), but listening as nobody: SO_PEERCRED says 65534.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    server.bind(str(path))
    os.chmod(path, 0o600)
    reach_checkout()
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    server.listen(8)
    os.write(ready, b"x")
    while True:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(wire.header(wire.ACCEPTED, wire.ACCEPTED_BODY.pack(3000)))
        conn.sendall(
            wire.outcome_message(
                0,
                uid=0,
                gid=0,
                perm=RESOLVED_KEY_PERM,
                negative_perm=0,
                timeout=60,
                negative_ttl=3,
                payload=b"kmst-poisoned",
            )
        )
        conn.close()


def test_a_daemon_of_another_uid_is_never_believed(served: Install) -> None:
    stop_daemon(served)
    sock = socket_of(served)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _impostor(sock, write_end)
        finally:
            os._exit(0)
    try:
        os.read(read_end, 1)
        name = unique("impostor")
        assert fresh_payload(served, name, served.blob(b"kmst-real", name)) == b"kmst-real"
        lines = [served.log.wait_for(name), served.log.wait_for(name)]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        os.close(write_end)
    assert any(
        "outcome=fallback" in x and f"served by uid {NOBODY}, not root" in x for x in lines
    ), lines
    assert any("outcome=ok" in x for x in lines), lines


def _ask(path: str) -> bytes:
    """Connect and send a request header; what the daemon says, or b"" when it closes on us."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect(path)
    try:
        conn.sendall(wire.header(wire.REQUEST, b"x" * 40))
        return conn.recv(100)
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        conn.close()


def test_the_daemon_serves_root_alone(served: Install) -> None:
    sock = str(socket_of(served))
    # A real setuid child: the daemon judges its peer by SO_PEERCRED, which reports the euid.
    refused = as_user(NOBODY, lambda: _ask(sock).hex(), mode="setuid")
    assert refused == {"error": "PermissionError", "errno": errno.EACCES}
    # Even with the socket and its directory open to all, nobody gets a word.
    os.chmod(sock, 0o666)
    os.chmod(os.path.dirname(sock), 0o755)
    try:
        assert as_user(NOBODY, lambda: _ask(sock).hex(), mode="setuid") == {"ok": ""}
    finally:
        os.chmod(sock, 0o600)
        os.chmod(os.path.dirname(sock), 0o700)
    name = unique("stillserving")
    assert fresh_payload(served, name, served.blob(b"kmst-still", name)) == b"kmst-still"


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"GET / HTTP/1.0\r\n\r\n",
        wire.HEADER.pack(b"KMKD", 99, wire.REQUEST, 10) + b"x" * 10,
        wire.HEADER.pack(b"KMKD", wire.VERSION, wire.REQUEST, 1 << 30),
        wire.header(wire.REQUEST, b"\0" * 40),  # no slot fd, no strings
        wire.header(wire.REPORT, b"\0" * 16),
    ],
    ids=["empty", "http", "version", "huge", "no-fd", "out-of-turn"],
)
def test_malformed_messages_get_nothing_and_leave_it_serving(
    served: Install, message: bytes
) -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect(os.fspath(socket_of(served)))
    with conn:
        conn.sendall(message)
        conn.shutdown(socket.SHUT_WR)
        try:
            answer = conn.recv(100)
        except ConnectionResetError:  # closed with our bytes unread: nothing either
            answer = b""
    assert answer in (b"", wire.header(wire.DECLINED, b"")), answer
    name = unique("aftermalformed")
    assert fresh_payload(served, name, served.blob(b"kmst-after", name)) == b"kmst-after"
    assert served.daemon is not None and served.daemon.poll() is None
