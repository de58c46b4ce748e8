"""The resolver daemon through the real upcall: misses answered by kmskeys-gate on the daemon's
word, without a Python start, and the handler as the fallback whenever the daemon is absent,
dead, hung or not root's (resolver/daemon.py, resolver/gate_daemon.c)."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kmskeys import Key, KeyNotFoundError, Keyring, TemporarilyUnavailableError
from kmskeys.cached import cached_failure
from kmskeys.contract import (
    ADMIN_KEY_PERM,
    ADMIN_NEGATIVE_KEY_PERM,
    NEGATIVE_KEY_PERM,
    POSSESSOR_MASK,
    RESOLVED_KEY_PERM,
)
from kmskeys.rules import rule_file
from resolver import wire
from tests.support.kms_proxy import DROP, ProxiedRequest
from tests.support.names import unique
from tests.support.reach import reach_checkout
from tests.support.requester import NOBODY, as_user
from tests.upcall.harness import KMSKEYS, Install

pytestmark = pytest.mark.upcall

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


@pytest.fixture
def served(extra_install: Callable[..., Any]) -> Iterator[Install]:
    """An install whose misses the resolver daemon serves (deadline 3 s)."""
    with extra_install(daemon=True, deadline=3, daemon_wait=DAEMON_WAIT) as install:
        assert install.daemon is not None and install.proxy is not None
        install.proxy.reset_counts()
        yield install


def _socket(install: Install) -> Path:
    return Path(install.settings["warm_socket"])


def _fresh(install: Install, name: str, blob: str | None) -> bytes:
    """The payload of `name` requested from a new session keyring (a miss, unless host-cached)."""
    Keyring.join_session()
    return Key.request(install.description(name), blob if blob is not None else b"").read()


def test_a_miss_is_answered_on_the_daemons_word(served: Install) -> None:
    assert served.daemon is not None
    name = unique("daemon")
    blob = served.blob(b"kmst-daemon-value", name)
    assert _fresh(served, name, blob) == b"kmst-daemon-value"
    line = served.log.wait_for(name)
    # The daemon wrote the line: no handler ran, nothing was imported for this miss.
    assert writer(line) == served.daemon.pid, line
    assert "outcome=ok" in line and "import" not in phases(line), line
    # The key is the handler's key: owner, group, mask and a timeout around the ttl.
    key = Key.request(served.description(name), blob)
    described = key.describe()
    assert described.uid == os.getuid()
    assert described.perm in (RESOLVED_KEY_PERM, ADMIN_KEY_PERM), hex(described.perm)
    # A host-cache answer for a second keyring, and refusals, come from the daemon too.
    assert _fresh(served, name, blob) == b"kmst-daemon-value"
    assert "source=hostcache" in served.log.wait_for(name)
    missing = unique("daemon-none")
    with pytest.raises(KeyNotFoundError):
        _fresh(served, missing, None)
    line = served.log.wait_for(missing)
    assert writer(line) == served.daemon.pid and "outcome=unknown" in line, line


def _refused_key(install: Install, name: str) -> tuple[int, int, int]:
    """The (uid, gid, perm) of the negative key a refusal of `name` leaves in a new session."""
    Keyring.join_session()
    with pytest.raises(KeyNotFoundError):
        Key.request(install.description(name), b"")
    negative = cached_failure(install.description(name))
    assert negative is not None, name
    return negative.uid, negative.gid, negative.perm


def test_a_refusal_by_the_daemon_leaves_the_handlers_negative_key(served: Install) -> None:
    """Issue 26.10: the refused key is the requester's, with no possessor bits and, with the
    admin group, its SETATTR (root's flush expires it), as the handler's _reject sets it."""
    assert served.daemon is not None
    by_daemon = unique("refused-daemon")
    daemons = _refused_key(served, by_daemon)
    line = served.log.wait_for(by_daemon)
    assert writer(line) == served.daemon.pid and "outcome=unknown" in line, line
    _stop(served)
    by_handler = unique("refused-handler")
    handlers = _refused_key(served, by_handler)
    line = served.log.wait_for(by_handler)
    assert writer(line) != served.daemon.pid and "outcome=unknown" in line, line
    assert daemons == handlers
    uid, _, perm = daemons
    assert uid == os.getuid() and not perm & POSSESSOR_MASK, hex(perm)
    assert perm in (NEGATIVE_KEY_PERM, ADMIN_NEGATIVE_KEY_PERM), hex(perm)


def test_without_a_daemon_the_handler_answers(served: Install) -> None:
    daemon = served.daemon
    assert daemon is not None
    daemon.terminate()
    daemon.wait(timeout=20)
    assert not _socket(served).exists(), "the daemon must remove its socket on SIGTERM"
    name = unique("nodaemon")
    assert _fresh(served, name, served.blob(b"kmst-cold", name)) == b"kmst-cold"
    line = served.log.wait_for(name)
    assert writer(line) != daemon.pid and "import" in phases(line), line


def test_a_stale_socket_of_a_dead_daemon_falls_back_at_once(served: Install) -> None:
    daemon = served.daemon
    assert daemon is not None
    daemon.kill()
    daemon.wait(timeout=20)
    assert _socket(served).exists()  # SIGKILL leaves it: connections are refused
    name = unique("stale")
    start = time.monotonic()
    assert _fresh(served, name, served.blob(b"kmst-stale", name)) == b"kmst-stale"
    line = served.log.wait_for(name)
    assert writer(line) != daemon.pid, line
    assert time.monotonic() - start < 3, "a refused connection must not cost daemon_wait"


def _stall_decrypt(arrived: threading.Event) -> Callable[[ProxiedRequest], object]:
    def stall(request: ProxiedRequest) -> object:
        if request.operation != "Decrypt":
            return None
        arrived.set()
        time.sleep(15)
        return DROP

    return stall


def _outcome_of(call: Callable[[], object]) -> tuple[list[object], threading.Thread]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return outcome, thread


def test_daemon_killed_mid_request_still_gets_the_key_answered(served: Install) -> None:
    daemon, proxy = served.daemon, served.proxy
    assert daemon is not None and proxy is not None
    name = unique("killed")
    blob = served.blob(b"kmst-survives", name)
    arrived = threading.Event()
    proxy.set_fault(_stall_decrypt(arrived))
    Keyring.join_session()
    start = time.monotonic()
    outcome, caller = _outcome_of(lambda: Key.request(served.description(name), blob).read())
    try:
        assert arrived.wait(5), "the daemon never called KMS"
        daemon.kill()  # SIGKILL while its KMS call hangs
        caller.join(timeout=10)
    finally:
        proxy.set_fault(None)
    # The gate ran the handler, whose KMS call hung too until what was left of the deadline:
    # EAGAIN (never cached), within the deadline, never the kernel's 60 s ENOKEY.
    assert [type(o) for o in outcome] == [TemporarilyUnavailableError], outcome
    assert time.monotonic() - start < 3 + 2
    line = served.log.wait_for(name)
    assert "outcome=unavailable" in line and writer(line) != daemon.pid, line
    assert _fresh(served, name, blob) == b"kmst-survives"  # the handler, from now on


def test_a_hung_daemon_costs_daemon_wait_then_the_handler_answers(served: Install) -> None:
    daemon = served.daemon
    assert daemon is not None
    name = unique("hung")
    blob = served.blob(b"kmst-hung", name)
    os.kill(daemon.pid, signal.SIGSTOP)  # its socket still accepts connections (the backlog)
    try:
        start = time.monotonic()
        assert _fresh(served, name, blob) == b"kmst-hung"
        took = time.monotonic() - start
        line = served.log.wait_for(name)
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert writer(line) != daemon.pid, line
    assert took >= DAEMON_WAIT, took
    # Resumed, the daemon finds the request abandoned: no second line, and it serves again.
    time.sleep(1)
    assert not [x for x in served.log.drain() if f" name={name} " in x]
    again = unique("resumed")
    assert _fresh(served, again, served.blob(b"kmst-resumed", again)) == b"kmst-resumed"
    assert writer(served.log.wait_for(again)) == daemon.pid


@contextmanager
def _fake_daemon(path: Path, serve: Callable[[socket.socket], None]) -> Iterator[None]:
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


def _stop(install: Install) -> None:
    assert install.daemon is not None
    install.daemon.terminate()
    install.daemon.wait(timeout=20)


def test_a_daemon_that_accepts_and_never_answers_is_a_bounded_eagain(served: Install) -> None:
    _stop(served)
    conns: list[socket.socket] = []

    def accept_only(conn: socket.socket) -> None:
        conns.append(conn)  # kept open, never answered past ACCEPTED
        conn.recv(65536)
        conn.sendall(wire.header(wire.ACCEPTED, wire.ACCEPTED_BODY.pack(1500)))

    name = unique("silent")
    blob = served.blob(b"kmst-silent", name)
    with _fake_daemon(_socket(served), accept_only):
        start = time.monotonic()
        with pytest.raises(TemporarilyUnavailableError):
            _fresh(served, name, blob)
        took = time.monotonic() - start
    for conn in conns:
        conn.close()
    assert 1.5 <= took < 5, took
    line = served.log.wait_for(name)
    assert "outcome=unavailable" in line and "did not answer within 1500 ms" in line, line
    assert served.decrypts() == 0


def test_an_answer_the_gate_cannot_accept_falls_back_to_the_handler(served: Install) -> None:
    _stop(served)
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

    with _fake_daemon(_socket(served), lie):
        assert _fresh(served, name, blob) == b"kmst-real"
    lines = [served.log.wait_for(name), served.log.wait_for(name)]
    assert any("outcome=fallback" in x and "not one the gate accepts" in x for x in lines), lines
    assert any("outcome=ok" in x for x in lines), lines


def test_a_refusal_whose_mask_gives_possessors_anything_falls_back_to_the_handler(
    served: Install,
) -> None:
    _stop(served)
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

    with _fake_daemon(_socket(served), lie):
        assert _refused_key(served, name)[2] in (NEGATIVE_KEY_PERM, ADMIN_NEGATIVE_KEY_PERM)
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
    _stop(served)
    sock = _socket(served)
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
        assert _fresh(served, name, served.blob(b"kmst-real", name)) == b"kmst-real"
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
    sock = str(_socket(served))
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
    assert _fresh(served, name, served.blob(b"kmst-still", name)) == b"kmst-still"


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
    conn.connect(os.fspath(_socket(served)))
    with conn:
        conn.sendall(message)
        conn.shutdown(socket.SHUT_WR)
        try:
            answer = conn.recv(100)
        except ConnectionResetError:  # closed with our bytes unread: nothing either
            answer = b""
    assert answer in (b"", wire.header(wire.DECLINED, b"")), answer
    name = unique("aftermalformed")
    assert _fresh(served, name, served.blob(b"kmst-after", name)) == b"kmst-after"
    assert served.daemon is not None and served.daemon.poll() is None


def test_doctor_says_which_path_a_miss_takes(served: Install, extra_install: Any) -> None:
    def doctor(install: Install) -> str:
        # In a network namespace of its own: doctor probes IMDS.
        args = ["unshare", "--net", str(KMSKEYS), "doctor", "--prefix", install.prefix]
        args += ["--config", str(install.config)]
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
        return done.stdout

    sock = _socket(served)
    assert f"ok   misses go to the resolver daemon on {sock}" in doctor(served)
    _stop(served)
    down = doctor(served)
    assert f"warn warm_socket {sock} is set but no daemon answers" in down, down
    assert "the gate runs the handler" in down, down
    with extra_install(daemon=False) as cold:
        assert "info no resolver daemon: each miss starts the handler" in doctor(cold)


def test_the_gate_hands_over_what_the_kernel_says_of_the_request(served: Install) -> None:
    # A listener of root's in the daemon's place keeps what the gate sends, then declines (the
    # handler answers): each field is the kernel's, and the identification's facts are there.
    _stop(served)
    got: list[tuple[bytes, list[int]]] = []

    def keep(conn: socket.socket) -> None:
        with conn:
            body, fds = wire.receive_request(conn)
            got.append((body, fds))
            conn.sendall(wire.header(wire.DECLINED, b""))

    name = unique("handover")
    blob = served.blob(b"kmst-handover", name)
    Keyring.join_session()
    session = Keyring.session().serial
    with _fake_daemon(_socket(served), keep):
        assert Key.request(served.description(name), blob).read() == b"kmst-handover"
    ((body, fds),) = got
    try:
        request = wire.GateRequest(body)
        slot = os.readlink(f"/proc/self/fd/{fds[0]}")
    finally:
        for fd in fds:
            os.close(fd)
    assert request.description == served.description(name).encode()
    assert request.config == str(served.config)
    assert request.callout == blob.encode() and request.uid == os.getuid()
    assert slot.startswith(f"{served.settings['state_dir']}/slot-{os.getuid()}-")
    assert request.keyrings[2] == session and request.dest == session
    assert request.dest_description.startswith("keyring;")
    # The authorization key's own line, naming this very thread as the requester.
    (line,) = request.lines
    assert line.startswith(b"%08x " % request.auth), line
    assert f" key:{request.key:x} pid:{threading.get_native_id()} ".encode() in line, line


def test_a_daemon_serves_the_misses_of_its_own_config_alone(
    served: Install, extra_install: Callable[..., Any]
) -> None:
    # Another install whose rule names the same socket: install refuses to write that (two
    # installs sharing host resources, resolver/installclash.py), so its rule is edited by hand,
    # as an operator might. Its gate asks the daemon, which declines a miss meant for another
    # config; that install's own handler answers it.
    assert served.daemon is not None
    own = Path(served.settings["warm_socket"]).parent / f"{unique('othersock')}.sock"
    with extra_install(daemon=False, warm_socket=own) as other:
        path = rule_file(other.prefix)
        text = path.read_text()
        assert f" {own} " in text, text
        path.write_text(text.replace(f" {own} ", f" {_socket(served)} "))
        name = unique("otherconfig")
        assert _fresh(other, name, other.blob(b"kmst-other", name)) == b"kmst-other"
        line = other.log.wait_for(name)
        assert writer(line) != served.daemon.pid and "import" in phases(line), line
