"""The rotation case of docs/scale.md: a rotation event fanned out to a fleet by Run Command.

A secret rotates; EventBridge starts the fleet-rotation runbook (terraform/modules/
fleet-rotation), whose Run Command sends the flush document to every tagged host, at most
MaxConcurrency at a time; each host waits a random 0..JitterSeconds, flushes (every uid's key
and the host-cache entry), and its uids, asking continuously, re-resolve the secret. Counted:
GetSecretValue (or GetParameter) calls per second against the service's quota, the KMS Decrypt
each of them makes on the account's behalf, and how long until every uid has the new value.

Stdlib only, deterministic (a seeded random.Random), imported by scripts/fleet_sim.py (which
writes it into docs/scale.md) and by the fleet row of the benchmark (tests/bench/fleet.py).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

# Secrets Manager: "Combined rate of DescribeSecret and GetSecretValue API requests", each
# Region, not adjustable (10,000 since March 2025), from
# https://docs.aws.amazon.com/secretsmanager/latest/userguide/reference_limits.html
SECRETS_MANAGER_TPS = 10_000
# Parameter Store's default throughput, shared by GetParameter, GetParameters and
# GetParametersByPath, per account and Region (a paid "higher throughput" setting raises it),
# from https://docs.aws.amazon.com/systems-manager/latest/userguide/parameter-store-throughput.html
PARAMETER_STORE_TPS = 40
# KMS "Cryptographic operations (symmetric)" in most Regions (scripts/fleet_sim.py QUOTAS):
# each GetSecretValue of a secret under a customer managed key, and each GetParameter of a
# SecureString, is one Decrypt that the service makes on the account's behalf.
KMS_TPS = 10_000
# SendCommand's rate controls when none are given, which is the case of EventBridge's own Run
# Command target (SSM API reference, SendCommand: MaxConcurrency 50, MaxErrors 0).
SEND_COMMAND_DEFAULT_CONCURRENCY = 50


@dataclass(frozen=True)
class Rotation:
    """One rotation of one secret, fanned out to a fleet. Times in seconds."""

    hosts: int = 100
    uids: int = 5  # uids (services) per host that read the secret
    host_cache: bool = True
    concurrency: int | None = None  # Run Command MaxConcurrency as a count; None: every host
    concurrency_pct: int | None = None  # MaxConcurrency as a percentage of the hosts
    jitter: float = 0.0  # the document's JitterSeconds
    flush: bool = True  # False: no event, keys run out on their own (ttl ± ttl_jitter)
    agent_delay: tuple[float, float] = (0.5, 2.0)  # SendCommand to the script starting (polling)
    flush_seconds: float = 0.2  # the script and `kmskeys flush` itself
    request_gap: float = 1.0  # after its key is gone, a uid asks again within this long
    call_seconds: float = 0.05  # one GetSecretValue round trip
    lock_wait: float = 1.0  # the host cache's refresh lock waits at most this long
    ttl: int = 300  # resolver ttl, for the no-flush case
    ttl_jitter: float = 0.10


@dataclass
class Outcome:
    """What one rotation cost: the calls by second, and when the last uid had the new value."""

    rotation: Rotation
    calls: list[float]  # the time of every GetSecretValue

    done: float = 0.0  # seconds from the event until every uid has the new value

    @property
    def per_host(self) -> float:
        return len(self.calls) / self.rotation.hosts

    @property
    def peak(self) -> int:
        """The most calls in any one second (the quotas are per second)."""
        if not self.calls:
            return 0
        counts: dict[int, int] = {}
        for t in self.calls:
            counts[int(t)] = counts.get(int(t), 0) + 1
        return max(counts.values())


def width_of(rotation: Rotation) -> int:
    """How many hosts Run Command keeps in progress at once."""
    if rotation.concurrency_pct is not None:
        return max(1, math.ceil(rotation.hosts * rotation.concurrency_pct / 100))
    return rotation.hosts if rotation.concurrency is None else rotation.concurrency


def _flush_times(rotation: Rotation, rng: random.Random) -> list[float]:
    """When each host flushes: Run Command keeps at most `concurrency` hosts in progress, and a
    host's slot lasts its agent delay, its jitter wait and the flush itself."""
    width = width_of(rotation)
    free = [0.0] * min(width, rotation.hosts)  # when each slot frees up
    heapq.heapify(free)
    low, high = rotation.agent_delay
    times = []
    for _ in range(rotation.hosts):
        start = heapq.heappop(free)
        flushed = start + rng.uniform(low, high) + rng.uniform(0.0, rotation.jitter)
        times.append(flushed)
        heapq.heappush(free, flushed + rotation.flush_seconds)
    return times


def _reresolve(rotation: Rotation, asks: Sequence[float], out: Outcome) -> float:
    """One host's uids asking at `asks` after their keys are gone: the calls they make, and
    when the last of them has the new value."""
    if not rotation.host_cache:
        out.calls.extend(asks)
        return max(asks) + rotation.call_seconds
    ordered = sorted(asks)
    answered = ordered[0] + rotation.call_seconds  # the first miss refreshes the entry
    out.calls.append(ordered[0])
    for t in ordered[1:]:
        if t < answered and t + rotation.lock_wait < answered:
            out.calls.append(t + rotation.lock_wait)  # gave up waiting: a call of its own
    return max(answered, ordered[-1])


def _expiry_asks(rotation: Rotation, rng: random.Random) -> tuple[float, list[float]]:
    """Without a flush: the host entry's next refresh is somewhere in its lifetime, and each
    uid asks at its key's first expiry after that (before it, the old entry answers)."""
    longest = rotation.ttl * (1 + rotation.ttl_jitter)
    entry = rng.uniform(0.0, longest)
    asks = []
    for _ in range(rotation.uids):
        expiry = rng.uniform(0.0, longest)
        while expiry < entry:
            expiry += rotation.ttl * (1 + rotation.ttl_jitter * (2 * rng.random() - 1))
        asks.append(expiry)
    return entry, asks


def simulate(rotation: Rotation, seed: int) -> Outcome:
    """One rotation event at t=0 over the whole fleet."""
    # A model's draws, not key material: a seeded, reproducible generator is the point.
    rng = random.Random(f"{seed}:rotation")  # noqa: S311
    out = Outcome(rotation, [])
    if rotation.flush:
        flushed = _flush_times(rotation, rng)
        for t in flushed:
            asks = [t + rng.uniform(0.0, rotation.request_gap) for _ in range(rotation.uids)]
            out.done = max(out.done, _reresolve(rotation, asks, out))
    else:
        for _ in range(rotation.hosts):
            _, asks = _expiry_asks(rotation, rng)
            out.done = max(out.done, _reresolve(rotation, asks, out))
    return out


def hosts_at(quota: int, rotation: Rotation, seed: int) -> str:
    """The fleet size (two significant figures) whose peak reaches `quota`, or never.

    The peak grows in proportion to the fleet until a MaxConcurrency given as a count caps it:
    capped below the quota (measured on twenty times the count), it never reaches it; else the
    size comes from a fleet as wide as the cap, where every host still flushes at once.
    """
    base = rotation.hosts
    if rotation.concurrency is not None:
        capped = replace(rotation, hosts=max(base, 20 * rotation.concurrency))
        if simulate(capped, seed).peak < quota:
            return "never"
        base = min(base, rotation.concurrency)
    peak = simulate(replace(rotation, hosts=base), seed).peak
    return _two_figures(quota * base / peak) if peak else "never"


def _two_figures(hosts: float) -> str:
    digits = max(0, len(str(int(hosts))) - 2)
    return f"{round(hosts, -digits):,.0f}"


# Rotations compared in docs/scale.md: (label, rotation).
def configurations(hosts: int) -> list[tuple[str, Rotation]]:
    """The table's rows for a fleet of `hosts`."""
    base = Rotation(hosts=hosts)
    default = SEND_COMMAND_DEFAULT_CONCURRENCY
    return [
        ("no event: keys run out (ttl 300 s ± 10 %)", replace(base, flush=False)),
        ("every host at once, no host cache", replace(base, host_cache=False)),
        ("every host at once", base),
        (
            f"Run Command target (MaxConcurrency {default}, SSM's default)",
            replace(base, concurrency=default),
        ),
        ("runbook, MaxConcurrency 10% (the module's default)", replace(base, concurrency_pct=10)),
        ("runbook, MaxConcurrency 20", replace(base, concurrency=20)),
        ("every host at once, JitterSeconds 30", replace(base, jitter=30.0)),
    ]


def markdown(seed: int) -> list[str]:
    """The rotation section of the generated block of docs/scale.md."""
    small, large = 100, 10_000
    rows = []
    for label, rotation in configurations(small):
        out = simulate(rotation, seed)
        calls = f"{len(out.calls):,} ({out.per_host:.2f} per host)"
        rows.append([label, calls, f"{out.peak:,}", f"{out.done:,.0f} s"])
    first = _table(
        ["fan-out", "GetSecretValue calls", "peak calls /s", "every uid has the new value"],
        rows,
    )
    rows = []
    for label, rotation in configurations(large):
        out = simulate(rotation, seed)
        reach = [hosts_at(q, rotation, seed) for q in (PARAMETER_STORE_TPS, SECRETS_MANAGER_TPS)]
        rows.append([label, f"{out.peak:,}", f"{out.done:,.0f} s", *reach])
    second = _table(
        [
            "fan-out",
            "peak calls /s",
            "every uid has the new value",
            f"hosts at Parameter Store's {PARAMETER_STORE_TPS}/s",
            f"hosts at Secrets Manager's {SECRETS_MANAGER_TPS // 1000}k/s (and KMS's)",
        ],
        rows,
    )
    base = Rotation()
    low, high = base.agent_delay
    return [
        "### A rotation fanned out by Run Command",
        "",
        f"Seed {seed}. One secret rotates; each host's {base.uids} uids read it continuously "
        f"(a uid asks again within {base.request_gap:.0f} s of losing its key). Run Command "
        f"starts the flush on a host {low:g} to {high:g} s after it is sent (the agent's "
        f"polling), the flush takes {base.flush_seconds:g} s, a GetSecretValue "
        f"{base.call_seconds * 1000:.0f} ms. Calls are counted per second; each is also one "
        "KMS Decrypt made on the account's behalf.",
        "",
        f"{small} hosts x {base.uids} uids:",
        "",
        *first,
        "",
        f"{large:,} hosts x {base.uids} uids, and the fleet size whose peak reaches each quota "
        "(never: MaxConcurrency caps the peak below it):",
        "",
        *second,
    ]


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
