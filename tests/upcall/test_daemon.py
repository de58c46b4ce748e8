"""The resolver daemon through the real upcall: misses answered by kmskeys-gate on the daemon's
word, without a Python start, and the handler as the fallback whenever the daemon is absent,
dead, hung or not root's (resolver/daemon.py, resolver/gate_daemon.c)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kmskeys import Key, KeyNotFoundError, Keyring, TemporarilyUnavailableError
from kmskeys.contract import (
    ADMIN_KEY_PERM,
    ADMIN_NEGATIVE_KEY_PERM,
    NEGATIVE_KEY_PERM,
    POSSESSOR_MASK,
    PROGRAM_ADMIN_KEY_PERM,
    PROGRAM_KEY_PERM,
    RESOLVED_KEY_PERM,
)
from kmskeys.rules import rule_file
from resolver import wire
from tests.support.kms_proxy import DROP, ProxiedRequest
from tests.support.names import unique
from tests.upcall.daemonpath import (
    DAEMON_WAIT,
    fake_daemon,
    fresh_payload,
    phases,
    refused_key,
    socket_of,
    stop_daemon,
    writer,
)
from tests.upcall.harness import KMSKEYS, Install

pytestmark = pytest.mark.upcall


def test_a_miss_is_answered_on_the_daemons_word(served: Install) -> None:
    assert served.daemon is not None
    name = unique("daemon")
    blob = served.blob(b"kmst-daemon-value", name)
    assert fresh_payload(served, name, blob) == b"kmst-daemon-value"
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
    assert fresh_payload(served, name, blob) == b"kmst-daemon-value"
    assert "source=hostcache" in served.log.wait_for(name)
    missing = unique("daemon-none")
    with pytest.raises(KeyNotFoundError):
        fresh_payload(served, missing, None)
    line = served.log.wait_for(missing)
    assert writer(line) == served.daemon.pid and "outcome=unknown" in line, line


def test_a_refusal_by_the_daemon_leaves_the_handlers_negative_key(served: Install) -> None:
    """Issue 26.10: the refused key is the requester's, with no possessor bits and, with the
    admin group, its SETATTR (root's flush expires it), as the handler's _reject sets it."""
    assert served.daemon is not None
    by_daemon = unique("refused-daemon")
    daemons = refused_key(served, by_daemon)
    line = served.log.wait_for(by_daemon)
    assert writer(line) == served.daemon.pid and "outcome=unknown" in line, line
    stop_daemon(served)
    by_handler = unique("refused-handler")
    handlers = refused_key(served, by_handler)
    line = served.log.wait_for(by_handler)
    assert writer(line) != served.daemon.pid and "outcome=unknown" in line, line
    assert daemons == handlers
    uid, _, perm = daemons
    assert uid == os.getuid() and not perm & POSSESSOR_MASK, hex(perm)
    assert perm in (NEGATIVE_KEY_PERM, ADMIN_NEGATIVE_KEY_PERM), hex(perm)


def test_a_kept_connection_closed_by_the_endpoint_costs_one_more_call(served: Install) -> None:
    """The daemon keeps its KMS client, and its connection, between misses. An endpoint closes
    a kept connection when it likes, at worst just as the next request arrives on it, which is
    then lost unanswered: the gateway calls again, on a new connection, within the deadline."""
    assert served.daemon is not None and served.proxy is not None
    first, second = unique("kept"), unique("kept")
    blobs = {name: served.blob(f"kmst-{name}".encode(), name) for name in (first, second)}
    assert fresh_payload(served, first, blobs[first]) == f"kmst-{first}".encode()
    served.log.wait_for(first)
    closed: list[int] = []

    def close_kept(request: ProxiedRequest) -> object:
        if request.operation != "Decrypt" or request.sequence == 1 or closed:
            return None
        closed.append(request.sequence)
        return DROP

    served.proxy.set_fault(close_kept)
    try:
        assert fresh_payload(served, second, blobs[second]) == f"kmst-{second}".encode()
    finally:
        served.proxy.set_fault(None)
    line = served.log.wait_for(second)
    assert writer(line) == served.daemon.pid and "outcome=ok" in line, line
    assert closed, "the second miss came on a new connection: the first one was not kept"
    assert served.proxy.count("Decrypt") == 3, "one call each, and the lost one called again"


def test_without_a_daemon_the_handler_answers(served: Install) -> None:
    daemon = served.daemon
    assert daemon is not None
    daemon.terminate()
    daemon.wait(timeout=20)
    assert not socket_of(served).exists(), "the daemon must remove its socket on SIGTERM"
    name = unique("nodaemon")
    assert fresh_payload(served, name, served.blob(b"kmst-cold", name)) == b"kmst-cold"
    line = served.log.wait_for(name)
    assert writer(line) != daemon.pid and "import" in phases(line), line


def test_a_stale_socket_of_a_dead_daemon_falls_back_at_once(served: Install) -> None:
    daemon = served.daemon
    assert daemon is not None
    daemon.kill()
    daemon.wait(timeout=20)
    assert socket_of(served).exists()  # SIGKILL leaves it: connections are refused
    name = unique("stale")
    start = time.monotonic()
    assert fresh_payload(served, name, served.blob(b"kmst-stale", name)) == b"kmst-stale"
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
    assert fresh_payload(served, name, blob) == b"kmst-survives"  # the handler, from now on


def test_a_hung_daemon_costs_daemon_wait_then_the_handler_answers(served: Install) -> None:
    daemon = served.daemon
    assert daemon is not None
    name = unique("hung")
    blob = served.blob(b"kmst-hung", name)
    os.kill(daemon.pid, signal.SIGSTOP)  # its socket still accepts connections (the backlog)
    try:
        start = time.monotonic()
        assert fresh_payload(served, name, blob) == b"kmst-hung"
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
    assert fresh_payload(served, again, served.blob(b"kmst-resumed", again)) == b"kmst-resumed"
    assert writer(served.log.wait_for(again)) == daemon.pid


def test_doctor_says_which_path_a_miss_takes(served: Install, extra_install: Any) -> None:
    def doctor(install: Install) -> str:
        # In a network namespace of its own: doctor probes IMDS.
        args = ["unshare", "--net", str(KMSKEYS), "doctor", "--prefix", install.prefix]
        args += ["--config", str(install.config)]
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
        return done.stdout

    sock = socket_of(served)
    assert f"ok   misses go to the resolver daemon on {sock}" in doctor(served)
    stop_daemon(served)
    down = doctor(served)
    assert f"warn warm_socket {sock} is set but no daemon answers" in down, down
    assert "the gate runs the handler" in down, down
    with extra_install(daemon=False) as cold:
        assert "info no resolver daemon: each miss starts the handler" in doctor(cold)


def test_the_gate_hands_over_what_the_kernel_says_of_the_request(served: Install) -> None:
    # A listener of root's in the daemon's place keeps what the gate sends, then declines (the
    # handler answers): each field is the kernel's. The authority's view, /proc/keys lines
    # included, comes only when asked for (VIEW_ASK), in a message of its own.
    stop_daemon(served)
    got: list[tuple[bytes, list[int], bytes | None, int, bytes]] = []

    def keep(conn: socket.socket) -> None:
        with conn:
            body, fds = wire.receive_request(conn)
            conn.sendall(wire.header(wire.ACCEPTED, wire.ACCEPTED_BODY.pack(5000)))
            conn.settimeout(0.3)
            try:
                unasked: bytes | None = conn.recv(1)  # b"": closed; anything else: sent unasked
            except TimeoutError:
                unasked = None  # the gate waits for the outcome, sending nothing of its own
            conn.settimeout(5)
            conn.sendall(wire.header(wire.VIEW_ASK, b""))
            kind, view = wire.read_message(conn, wire.VIEW_MAX)
            got.append((body, fds, unasked, kind, view))
            conn.sendall(wire.header(wire.DECLINED, b""))

    name = unique("handover")
    blob = served.blob(b"kmst-handover", name)
    Keyring.join_session()
    session = Keyring.session().serial
    with fake_daemon(socket_of(served), keep):
        assert Key.request(served.description(name), blob).read() == b"kmst-handover"
    ((body, fds, unasked, kind, view_body),) = got
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
    assert request.keyrings[2] == session
    assert unasked is None and kind == wire.VIEW
    view = wire.GateView(view_body)
    assert view.dest == session and view.dest_description.startswith("keyring;")
    # The authorization key's own line, naming this very thread as the requester.
    (line,) = view.lines
    assert view.seen == 1 and line.startswith(b"%08x " % request.auth), line
    assert f" key:{request.key:x} pid:{threading.get_native_id()} ".encode() in line, line


BOUND_POLICY = '\n[names."kmst-*-viewbound-*"]\nallow_cgroups = ["/**"]\n'


def test_only_a_program_bound_miss_asks_the_gate_for_its_view(
    extra_install: Callable[..., Any],
) -> None:
    # A plain name's miss never has the gate read /proc/keys (the kernel walks every key on
    # the host to generate it); a name bound to programs (`allow_cgroups`, root's config: never
    # the requester's description) has the daemon ask for the view, and identifies the
    # requester from it, on the daemon's path.
    with extra_install(daemon=True, names=BOUND_POLICY) as served:
        assert served.daemon is not None
        plain, bound = unique("viewplain"), unique("viewbound")
        assert fresh_payload(served, plain, served.blob(b"kmst-plain", plain)) == b"kmst-plain"
        line = served.log.wait_for(plain)
        assert writer(line) == served.daemon.pid, line
        assert not {"view", "identify"} & phases(line) and " pid=" not in line, line
        assert fresh_payload(served, bound, served.blob(b"kmst-bound", bound)) == b"kmst-bound"
        line = served.log.wait_for(bound)
        assert writer(line) == served.daemon.pid, line
        assert {"view", "identify"} <= phases(line), line
        # The requesting thread, named by the authorization key's line the gate read.
        assert f" pid={threading.get_native_id()} " in line, line
        key = Key.request(served.description(bound), b"")
        assert key.describe().perm in (PROGRAM_KEY_PERM, PROGRAM_ADMIN_KEY_PERM)


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
        path.write_text(text.replace(f" {own} ", f" {socket_of(served)} "))
        name = unique("otherconfig")
        assert fresh_payload(other, name, other.blob(b"kmst-other", name)) == b"kmst-other"
        line = other.log.wait_for(name)
        assert writer(line) != served.daemon.pid and "import" in phases(line), line
