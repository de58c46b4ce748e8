"""Mixed traffic for a fixed number of requests, with KMS faults 5% of the time.

20 names (half deployed in blob_dir, half sent inline), 3 users (root, daemon, nobody, each in
its own session keyring with several threads), TTLs of 3-6 s so keys expire throughout, and the
proxy failing 5% of the Decrypt calls (throttling, HTTP 500, AccessDenied, dropped connections,
hangs past the deadline). Counted: wrong payloads, hangs past deadline + 1 s, leaked resolver
processes and file descriptors, and the success rate of requests no fault could have touched.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from typing import Any

import pytest

from kmskeys import KmsKeysError, get_secret
from tests.soak.conftest import record
from tests.support.kms_proxy import DROP, Fault, ProxiedRequest, kms_error
from tests.support.requester import as_user
from tests.support.ttl import MIN_TTL
from tests.upcall.harness import Install, handler_pids, installed, kms_stack

pytestmark = pytest.mark.soak

# No shorter than MIN_TTL: a key must outlive its handler's exit (tests/support/ttl.py).
TTLS = (MIN_TTL, MIN_TTL + 1, MIN_TTL + 2, MIN_TTL + 3)
NAMES = 20
DEADLINE = 4
NEGATIVE_TTL = MIN_TTL
FAULT_RATE = 0.05
USERS = ("root", "daemon", "nobody")
SIZES = {"short": (2, 70), "long": (3, 800)}  # threads per user, requests per thread


def _faults() -> list[tuple[str, Any]]:
    return [
        ("throttled", lambda: kms_error("ThrottlingException", 400)),
        ("http500", lambda: Fault(500, b"oops", {"Content-Type": "text/plain"})),
        ("denied", lambda: kms_error("AccessDeniedException", 400)),
        ("dropped", lambda: DROP),
        ("hang", None),
    ]


class FaultLog:
    """The proxy hook: fails FAULT_RATE of Decrypts and remembers when, for which name."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.events: list[tuple[float, float, str, str]] = []  # start, end, name, kind

    def __call__(self, request: ProxiedRequest) -> object:
        if request.operation != "Decrypt":
            return None
        with self.lock:
            hit = self.rng.random() < FAULT_RATE
            kind, make = self.rng.choice(_faults())
        if not hit:
            return None
        name = json.loads(request.body).get("EncryptionContext", {}).get("kmskeys_name", "?")
        start = time.monotonic()
        if make is None:
            time.sleep(DEADLINE + 1)
            answer: object = DROP
        else:
            answer = make()
        with self.lock:
            self.events.append((start, time.monotonic(), name, kind))
        return answer

    def touched(self, name: str, start: float, end: float) -> bool:
        """Could a fault explain a failure of `name` requested during [start, end]?"""
        # A refusal stays cached for negative_ttl; allow for the resolver's own start-up too.
        with self.lock:
            return any(
                n == name and s <= end + 0.1 and e >= start - NEGATIVE_TTL - 1
                for s, e, n, _ in self.events
            )


def _field(line: str, key: str) -> str:
    rest = line.partition(f" {key}=")[2]
    return rest[1:].partition('"')[0] if rest.startswith('"') else rest.partition(" ")[0]


def _open_fds() -> dict[str, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return found


def _leaked_fds(before: dict[str, str]) -> dict[str, str]:
    """Descriptors open now that were not before, after the stack's threads have let go of
    theirs: a descriptor a finishing server thread still holds is not a leak, one that stays
    open for seconds is."""
    give_up = time.monotonic() + 5.0
    while True:
        leaked = {fd: what for fd, what in _open_fds().items() if before.get(fd) != what}
        if not leaked or time.monotonic() >= give_up:
            return leaked
        time.sleep(0.1)


def _workload(
    install: Install,
    secrets: dict[str, bytes],
    blobs: dict[str, str | None],
    *,
    threads: int,
    per_thread: int,
    seed: int,
) -> list[list[Any]]:
    """Run in a user's child: `threads` threads doing `per_thread` requests each."""
    rows: list[list[Any]] = []
    lock = threading.Lock()
    names = sorted(secrets)

    def worker(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        mine: list[list[Any]] = []
        for _ in range(per_thread):
            name = rng.choice(names)
            start = time.monotonic()
            try:
                value = get_secret(name, blobs[name], prefix=install.prefix)
                outcome = "ok" if value == secrets[name] else "wrong"
            except KmsKeysError as exc:
                outcome = type(exc).__name__
            mine.append([name, start, time.monotonic(), outcome])
            time.sleep(rng.uniform(0, 0.03))
        with lock:
            rows.extend(mine)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return rows


# A fixed number of requests, so the run ends by itself; the long one takes minutes, past the
# suite's default per-test timeout.
@pytest.mark.timeout(1200)
def test_soak_mixed_traffic_with_faults(soak_size: str) -> None:
    threads, per_thread = SIZES[soak_size]
    seed = int.from_bytes(os.urandom(4), "big")
    rules = "".join(f'\n[names."kmst-soak-t{t}-*"]\nttl = {t}\n' for t in TTLS)
    # Every miss goes to KMS, so that 5 % of them meet a fault: with the host cache a name is
    # decrypted once per ttl for the whole host and a short run could inject no fault at all.
    # (The host cache under faults: tests/faults/test_stale.py.)
    settings = {"deadline": DEADLINE, "negative_ttl": NEGATIVE_TTL, "host_cache": False}
    fds_before = _open_fds()
    with kms_stack() as stack, installed(*stack, names=rules, **settings) as install:
        secrets: dict[str, bytes] = {}
        blobs: dict[str, str | None] = {}
        for i in range(NAMES):
            name = f"kmst-soak-t{TTLS[i % len(TTLS)]}-{i:02d}"
            secrets[name] = f"kmst-soak-{i}-".encode() + os.urandom(8).hex().encode()
            text = install.blob(secrets[name], name, envelope=i % 5 == 0)
            if i % 2:
                install.deploy(name, text)
                blobs[name] = None
            else:
                blobs[name] = text
        faults = FaultLog(seed)
        assert install.proxy is not None
        install.proxy.set_fault(faults)
        started = time.monotonic()
        results: dict[str, object] = {}

        def run_user(user: str, index: int) -> None:
            results[user] = as_user(
                user,
                lambda: _workload(
                    install,
                    secrets,
                    blobs,
                    threads=threads,
                    per_thread=per_thread,
                    seed=seed + index,
                ),
            )

        users = [threading.Thread(target=run_user, args=(u, i)) for i, u in enumerate(USERS)]
        for thread in users:
            thread.start()
        for thread in users:
            thread.join()
        elapsed = time.monotonic() - started
        install.proxy.set_fault(None)
        leaked_processes = len(handler_pids(install.config))
        lines = install.log.drain()
        resolver_runs = len(lines)
        decrypts = install.decrypts()
    leaked_fds = _leaked_fds(fds_before)  # after the install and its log socket are gone

    rows: list[list[Any]] = []
    for user, result in results.items():
        assert isinstance(result, dict) and "ok" in result, (user, result)
        rows.extend(result["ok"])
    outcomes = Counter(row[3] for row in rows)
    hangs = sum(1 for _, start, end, _ in rows if end - start > DEADLINE + 1)
    failed = [row for row in rows if row[3] not in ("ok", "wrong")]
    unexplained = [row for row in failed if not faults.touched(row[0], row[1], row[2])]
    clean = len(rows) - (len(failed) - len(unexplained))
    clean_ok = outcomes["ok"]
    figures = {
        "requests": len(rows),
        "seconds": f"{elapsed:.1f}",
        "users x threads": f"{len(USERS)} x {threads}",
        "names / ttls": f"{NAMES} / {', '.join(map(str, TTLS))} s",
        "resolver runs (log lines)": resolver_runs,
        "KMS Decrypt calls": decrypts,
        "logged outcomes": dict(Counter(_field(line, "outcome") for line in lines)),
        "logged errors": [_field(line, "reason") for line in lines if " outcome=error " in line],
        "faults injected": f"{len(faults.events)} {dict(Counter(e[3] for e in faults.events))}",
        "outcomes": dict(outcomes),
        "wrong payloads": outcomes["wrong"],
        f"hangs past deadline+1 ({DEADLINE + 1} s)": hangs,
        "leaked resolver processes": leaked_processes,
        "leaked fds (test process)": len(leaked_fds),
        "failures with no fault active": len(unexplained),
        "success rate with no fault active": f"{100 * clean_ok / max(1, clean):.2f}%",
        "slowest request (s)": f"{max(end - start for _, start, end, _ in rows):.2f}",
        "seed": seed,
    }
    record(soak_size, figures)
    assert len(rows) == len(USERS) * threads * per_thread
    assert outcomes["wrong"] == 0
    assert hangs == 0
    assert leaked_processes == 0
    assert not leaked_fds, leaked_fds
    assert unexplained == [], unexplained[:5]
    assert faults.events, "the soak injected no fault"
    assert resolver_runs > len(USERS) * NAMES, "keys did not expire during the soak"
