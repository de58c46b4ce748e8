"""The resolver daemon under a herd, a hostile flood and a gate killed mid-request.

Kernel facts relied on: concurrent requesters of a key under construction share one upcall (one
gate); a gate killed before it answers leaves the key negated by the kernel (ENOKEY), so the
daemon must notice, log it, and give back what the request held (its slot, its thread).
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmskeys import (
    Key,
    KeyNotFoundError,
    KeyRejectedError,
    Keyring,
    KmsKeysError,
    TemporarilyUnavailableError,
)
from tests.faults.conftest import DEADLINE, FAULT_SETTINGS
from tests.faults.test_herd_and_kill import _herd
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy, ProxiedRequest, kms_error
from tests.support.names import unique
from tests.support.requester import NOBODY, as_user
from tests.upcall.harness import Install, flood, fresh, gate_pids, installed

pytestmark = pytest.mark.faults

HERD = 200
FLOOD = 200
SLOTS = 4
HOLD = 2.0


@pytest.fixture(scope="module")
def served(fault_backend: tuple[KmsEmulator, KmsProxy, str]) -> Iterator[Install]:
    """The tier's settings, with the resolver daemon serving the misses."""
    emulator, proxy, key_arn = fault_backend
    with installed(
        emulator,
        proxy,
        key_arn,
        daemon=True,
        max_concurrent_per_uid=SLOTS,
        **FAULT_SETTINGS,
    ) as install:
        yield install


@pytest.fixture
def daemon(served: Install, session_keyring: object) -> Iterator[Install]:
    """The daemon's install with no fault, counts and log reset, in a fresh session keyring."""
    assert served.daemon is not None
    with fresh(served):
        yield served
    assert served.daemon.poll() is None, "the daemon died"


def _daemon_lines(install: Install, name: str) -> list[str]:
    return [line for line in install.log.drain() if f" name={name} " in line]


def test_a_herd_of_cold_callers_makes_one_decrypt(daemon: Install) -> None:
    assert daemon.proxy is not None
    name = unique("dherd")
    secret = b"kmst-herd-" + os.urandom(6).hex().encode()
    text = daemon.blob(secret, name)

    def slow(request: ProxiedRequest) -> object:
        if request.operation == "Decrypt":
            time.sleep(0.5)  # the whole herd queues on the one key
        return None

    daemon.proxy.set_fault(slow)
    results = _herd(lambda: daemon.get(name, text), HERD)
    assert [outcome for _, outcome in results] == [secret] * HERD
    assert daemon.decrypts() == 1
    runs = _daemon_lines(daemon, name)
    assert len(runs) == 1 and "outcome=ok" in runs[0], runs
    assert f"kmskeys-resolver[{daemon.daemon.pid}]" in runs[0]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (lambda: kms_error("AccessDeniedException", 400), KeyRejectedError),
        (lambda: kms_error("ThrottlingException", 400), TemporarilyUnavailableError),
        (None, TemporarilyUnavailableError),  # KMS hangs past the deadline
    ],
    ids=["refused", "throttled", "hang"],
)
def test_a_herd_gets_the_same_error_promptly(daemon: Install, fault: object, error: type) -> None:
    assert daemon.proxy is not None
    name = unique("dherderr")
    text = daemon.blob(b"kmst-herd-secret", name)

    def hook(request: ProxiedRequest) -> object:
        if request.operation != "Decrypt":
            return None
        time.sleep(0.5 if fault is not None else DEADLINE + 3)
        return fault() if callable(fault) else None

    daemon.proxy.set_fault(hook)
    results = _herd(lambda: daemon.get(name, text), 100)
    assert {type(outcome) for _, outcome in results} == {error}
    slowest = max(seconds for seconds, _ in results)
    # The daemon answers at its deadline (counted from the gate's start), not past it.
    assert slowest < DEADLINE + 1, slowest
    runs = _daemon_lines(daemon, name)
    assert 1 <= len(runs) <= 10, runs


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_hostile_flood_costs_its_own_slots_and_never_holds_up_another_uid(
    daemon: Install,
) -> None:
    assert daemon.proxy is not None and daemon.daemon is not None
    pid = daemon.daemon.pid
    names = [unique("dflood") for _ in range(FLOOD)]
    blobs = {name: daemon.blob(b"kmst-flood", name) for name in names}
    held = threading.Semaphore(0)
    in_kms, peak = [0], [0]
    lock = threading.Lock()

    def hold(request: ProxiedRequest) -> object:
        if request.operation == "Decrypt" and b"dflood" in request.body:
            with lock:
                in_kms[0] += 1
                peak[0] = max(peak[0], in_kms[0])
            held.release()
            time.sleep(HOLD)
            with lock:
                in_kms[0] -= 1
        return None

    before_rss, before_threads = _rss_kib(pid), _threads(pid)
    daemon.proxy.set_fault(hold)
    outcome: list[object] = []
    attacker = threading.Thread(
        target=lambda: outcome.append(as_user(NOBODY, lambda: flood(daemon, names, blobs)))
    )
    attacker.start()
    try:
        assert held.acquire(timeout=10), "no flood request reached KMS"
        # While the flood's KMS calls are held, root's misses are answered, one after another.
        most_threads = _threads(pid)
        for _ in range(5):
            name = unique("dvictim")
            Keyring.join_session()
            start = time.monotonic()
            assert Key.request(daemon.description(name), daemon.blob(b"v", name)).read() == b"v"
            assert time.monotonic() - start < HOLD, "another uid's miss waited for the flood"
            most_threads = max(most_threads, _threads(pid))
        grown = _rss_kib(pid) - before_rss
    finally:
        attacker.join(60)
    (result,) = outcome
    ended = result["ok"] if isinstance(result, dict) else None
    assert isinstance(ended, dict), result
    # The gate's slots come before the daemon spends anything: SLOTS at a time reach KMS. The
    # rest is EAGAIN from the gate, or EDQUOT from the kernel (nobody's quota of 200 keys).
    assert peak[0] <= SLOTS, peak
    assert sum(ended.values()) == FLOOD, ended
    assert set(ended) <= {"ok", "TemporarilyUnavailableError", "QuotaExceededError"}, ended
    assert ended.get("TemporarilyUnavailableError", 0) >= FLOOD // 2, ended
    # Bounded: a thread or two per request in flight, and memory that does not follow the flood.
    assert most_threads - before_threads <= 2 * (SLOTS + 1) + 2, most_threads
    assert grown < 30 * 1024, f"the daemon grew by {grown} KiB"


def test_a_gate_killed_mid_request_is_logged_and_its_slot_given_back(daemon: Install) -> None:
    assert daemon.proxy is not None
    name = unique("dgate")
    text = daemon.blob(b"kmst-gate", name)
    arrived = threading.Event()

    def stall(request: ProxiedRequest) -> object:
        if request.operation == "Decrypt":
            arrived.set()
            time.sleep(1.0)
        return None

    daemon.proxy.set_fault(stall)
    result: list[object] = []

    def caller() -> None:
        try:
            result.append(daemon.get(name, text))
        except KmsKeysError as exc:
            result.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    assert arrived.wait(5)
    gates = gate_pids(daemon)
    assert gates
    gate = gates[0]
    os.kill(gate, signal.SIGKILL)
    thread.join(10)
    # Unanswered, the kernel negates the key itself.
    assert [type(r) for r in result] == [KeyNotFoundError], result
    (line,) = [x for x in _wait_lines(daemon, name) if "went away" in x]
    assert "outcome=unavailable" in line and "kmskeys-gate went away before the answer" in line
    # Its slot is free again once the request's KMS call is over.
    time.sleep(1.5)
    slots = sorted(Path(daemon.settings["state_dir"]).glob("slot-0-*"))
    assert slots
    for slot in slots:
        fd = os.open(slot, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def _wait_lines(install: Install, name: str) -> list[str]:
    return [install.log.wait_for(name)]
