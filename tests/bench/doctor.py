"""Doctor rows: `kmskeys doctor` on a healthy install, as root, end to end (budget < 1 s).

Root runs every check, the upcall probe and the resolver's own `check` included. In a network
namespace of its own IMDS is unreachable at once (a host off EC2); on the host's network an
IMDS address that does not answer costs doctor its 0.5 s connect timeout, the worst case.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.bench.common import BenchContext, Row, median, percentile, row, time_process
from tests.upcall.harness import installed, kms_stack

RUNS = 10
BUDGET_S = 1.0


def _shown(samples: list[float]) -> str:
    low, high = percentile(samples, 10) * 1000, percentile(samples, 90) * 1000
    return f"{median(samples) * 1000:.0f} ms (p10-p90 {low:.0f}-{high:.0f})"


def _time_any_exit(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=False, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def rows(ctx: BenchContext) -> list[Row]:
    """Doctor in its own network namespace, then on the host's network."""
    bare = ctx.bare()
    doctor = str(Path(ctx.python).parent / "kmskeys")
    with (
        kms_stack() as (emulator, proxy, key_arn),
        installed(emulator, proxy, key_arn, resolver=ctx.resolver) as install,
    ):
        args = [doctor, "doctor", "--prefix", install.prefix, "--config", str(install.config)]
        own_net = ["unshare", "--net", *args]
        healthy = subprocess.run(own_net, capture_output=True, text=True, check=False)
        assert healthy.returncode == 0, healthy.stdout  # the row is about a healthy host
        time_process(own_net)  # page cache
        alone = [time_process(own_net) for _ in range(RUNS)]
        # The host's network: doctor exits 1 if IMDS is reachable by app users here.
        host = [_time_any_exit([*args, "--json"]) for _ in range(RUNS // 2)]
    worst = max(alone)
    return [
        row(
            "`kmskeys doctor`, healthy install, as root (IMDS unreachable: off EC2)",
            value=_shown(alone),
            baseline=f"floor {bare.describe()}",
            ratio=f"max {worst * 1000:.0f} ms",
            budget=f"< {BUDGET_S:.0f} s",
            ok=worst < BUDGET_S,
        ),
        row(
            "`kmskeys doctor` on the host's network (an IMDS address may time out, 0.5 s)",
            value=_shown(host),
            baseline=f"floor {bare.describe()}",
            ratio=f"max {max(host) * 1000:.0f} ms",
            budget=f"< {BUDGET_S:.0f} s",
            ok=max(host) < BUDGET_S,
        ),
    ]
