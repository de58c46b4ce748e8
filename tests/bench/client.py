"""Client rows: a cache hit in process against C, and a fresh process's time to secret."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from kmskeys import Key, Keyring
from tests.bench.common import BenchContext, Row, median, row, time_process
from tests.support.names import unique

HIT_C = Path(__file__).with_name("hit.c")
HIT_ITERATIONS = 100_000
HIT_ROUNDS = 7
FRESH_RUNS = 30
SECRET = b"bench-secret-" + b"x" * 19  # a typical 32-byte password


def _compile_hit(ctx: BenchContext) -> Path:
    exe = ctx.tmp / "hit"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler: apt-get install gcc")
    subprocess.run([cc, "-O2", "-o", str(exe), str(HIT_C), "-lkeyutils"], check=True)
    return exe


def _python_hit_ns(desc: bytes) -> float:
    request = Key.request
    start = time.perf_counter()
    for _ in range(HIT_ITERATIONS):
        request(desc).read()
    return (time.perf_counter() - start) / HIT_ITERATIONS * 1e9


def hit_row(ctx: BenchContext, desc: str) -> Row:
    """Key.request + read on a cached key vs C request_key + keyctl_read, interleaved rounds."""
    exe = _compile_hit(ctx)
    ratios, py_ns, c_ns = [], [], []
    for _ in range(HIT_ROUNDS):
        out = subprocess.run(
            [str(exe), desc, str(HIT_ITERATIONS)], capture_output=True, text=True, check=True
        )
        c = float(out.stdout)
        py = _python_hit_ns(desc.encode())
        c_ns.append(c)
        py_ns.append(py)
        ratios.append(py / c)
    ratio = median(ratios)
    return row(
        "hit per call: Key.request + read",
        value=f"{median(py_ns) / 1000:.2f} µs",
        baseline=f"C request_key + keyctl_read {median(c_ns) / 1000:.2f} µs",
        ratio=f"{ratio:.2f}x",
        budget="≤ 2.0x",
        ok=ratio <= 2.0,
    )


def fresh_row(ctx: BenchContext, name: str, prefix: str) -> Row:
    """`python -c 'import kmskeys; get_secret()'` vs `python -c pass`, interleaved runs."""
    get = f"import kmskeys; kmskeys.get_secret({name!r}, prefix={prefix!r})"
    bare, client = [], []
    for _ in range(FRESH_RUNS):
        bare.append(time_process([ctx.python, "-c", "pass"]))
        client.append(time_process([ctx.python, "-c", get]))
    delta_ms = (median(client) - median(bare)) * 1000
    return row(
        "fresh process time-to-secret (cached key)",
        value=f"{median(client) * 1000:.1f} ms",
        baseline=f"python -c pass {median(bare) * 1000:.1f} ms",
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
        return [hit_row(ctx, f"{prefix}:{name}"), fresh_row(ctx, name, prefix)]
    finally:
        ring.clear()
        Keyring.join_session()
