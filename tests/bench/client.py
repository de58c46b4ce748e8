"""Client rows: a cache hit in process against C, and a fresh process's time to secret."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from kmskeys import Key, Keyring, get_secret
from tests.bench.common import BenchContext, Row, median, percentile, row, time_process
from tests.support.names import unique

HIT_C = Path(__file__).with_name("hit.c")
HIT_ITERATIONS = 100_000
HIT_ROUNDS = 7
FRESH_RUNS = 30
# docs/design.md, Budgets: a hit through get_secret, and through Key.request(...).read() (both
# with the owner check), costs at most 1.5x the C program's request + read.
HIT_BUDGET = 1.5
SECRET = b"bench-secret-" + b"x" * 19  # a typical 32-byte password


def _compile_hit(ctx: BenchContext) -> Path:
    exe = ctx.tmp / "hit"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler: apt-get install gcc")
    subprocess.run([cc, "-O2", "-o", str(exe), str(HIT_C), "-lkeyutils"], check=True)
    return exe


def _per_call_ns(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    for _ in range(HIT_ITERATIONS):
        call()
    return (time.perf_counter() - start) / HIT_ITERATIONS * 1e9


def hit_rows(ctx: BenchContext, prefix: str, name: str) -> list[Row]:
    """get_secret and Key.request + read on a cached key vs C, in interleaved rounds; each row
    with the owner check of the safe tier (the low-level tier's unchecked calls are not the
    applications' API)."""
    exe = _compile_hit(ctx)
    desc = f"{prefix}:{name}"
    request = Key.request
    calls: dict[str, Callable[[], object]] = {
        # The README's API: what an application calls on every use of the secret.
        "get_secret": lambda: get_secret(name, prefix=prefix),
        # The design card's and the essay's form (issue 20.1).
        "request": lambda: request(desc.encode()).read(),
    }
    ns: dict[str, list[float]] = {"c": [], "get_secret": [], "request": []}
    ratios: dict[str, list[float]] = {"get_secret": [], "request": []}
    for _ in range(HIT_ROUNDS):
        out = subprocess.run(
            [str(exe), desc, str(HIT_ITERATIONS)], capture_output=True, text=True, check=True
        )
        c = float(out.stdout)
        ns["c"].append(c)
        for label, call in calls.items():
            measured = _per_call_ns(call)
            ns[label].append(measured)
            ratios[label].append(measured / c)
    baseline = f"C request_key + keyctl_read {median(ns['c']) / 1000:.2f} µs"
    get_ratio, request_ratio = median(ratios["get_secret"]), median(ratios["request"])
    return [
        row(
            "hit per call: kmskeys.get_secret (the README's API)",
            value=f"{median(ns['get_secret']) / 1000:.2f} µs",
            baseline=baseline,
            ratio=f"{get_ratio:.2f}x",
            budget=f"≤ {HIT_BUDGET}x",
            ok=get_ratio <= HIT_BUDGET,
        ),
        row(
            "hit per call: Key.request(desc).read(), owner-checked (the card's form)",
            value=f"{median(ns['request']) / 1000:.2f} µs",
            baseline=baseline,
            ratio=f"{request_ratio:.2f}x",
            budget=f"≤ {HIT_BUDGET}x",
            ok=request_ratio <= HIT_BUDGET,
        ),
    ]


def fresh_row(ctx: BenchContext, name: str, prefix: str) -> Row:
    """`python -c 'import kmskeys; get_secret()'` against the run's `python -c pass` baseline."""
    get = f"import kmskeys; kmskeys.get_secret({name!r}, prefix={prefix!r})"
    bare = ctx.bare()
    client = [time_process([ctx.python, "-c", get], env=ctx.env()) for _ in range(FRESH_RUNS)]
    delta_ms = median(client) * 1000 - bare.median_ms
    low, high = percentile(client, 10) * 1000, percentile(client, 90) * 1000
    return row(
        "fresh process time-to-secret (cached key)",
        value=f"{median(client) * 1000:.1f} ms (p10-p90 {low:.1f}-{high:.1f})",
        baseline=bare.describe(),
        ratio=f"+{delta_ms:.1f} ms",
        budget="≤ +5 ms",
        ok=delta_ms <= 5.0,
    )


def rows(ctx: BenchContext) -> list[Row]:
    """The client rows, on a key cached in a fresh session keyring."""
    ring = Keyring.join_session()
    try:
        prefix, name = "kmstbench", unique("hit")
        ring.add_key("user", f"{prefix}:{name}", SECRET)
        return [*hit_rows(ctx, prefix, name), fresh_row(ctx, name, prefix)]
    finally:
        ring.clear()
        Keyring.join_session()
