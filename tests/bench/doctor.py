"""Doctor rows: `kmskeys doctor` on a healthy install, as root, end to end (budget < 1 s).

Root runs every check, the upcall probe and the resolver's own `check` included. Doctor probes
IMDS, so it never runs on the host's network here: in a network namespace of its own with
nothing routed, IMDS is unreachable at once (a host off EC2); in one where both IMDS addresses
are routed but every packet to them is dropped, each probe waits for its 0.5 s connect timeout,
the worst case (an IMDS address that does not answer).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kmskeys.imds import IMDS_IPV4, IMDS_IPV6
from tests.bench.common import BenchContext, Row, median, percentile, row, time_process
from tests.support.names import unique
from tests.upcall.harness import installed, kms_stack

RUNS = 10
BUDGET_S = 1.0


def _shown(samples: list[float]) -> str:
    low, high = percentile(samples, 10) * 1000, percentile(samples, 90) * 1000
    return f"{median(samples) * 1000:.0f} ms (p10-p90 {low:.0f}-{high:.0f})"


# Routed (through lo), then dropped before they leave: a connect to IMDS is never answered.
SILENT_IMDS = f"""
table inet kmst-silent-imds {{
  chain output {{
    type filter hook output priority raw; policy accept;
    ip daddr {IMDS_IPV4} drop
    ip6 daddr {IMDS_IPV6} drop
  }}
}}
"""


@contextmanager
def silent_imds_netns() -> Iterator[list[str]]:
    """A network namespace where IMDS never answers: the argv prefix that runs in it."""
    name = unique("doctor")
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        inside = ["ip", "netns", "exec", name]
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "route", "add", f"{IMDS_IPV4}/32", "dev", "lo"],
            ["ip", "-6", "route", "add", f"{IMDS_IPV6}/128", "dev", "lo"],
        ):
            subprocess.run([*inside, *argv], check=True, capture_output=True)
        subprocess.run(
            [*inside, "nft", "-f", "-"], input=SILENT_IMDS, text=True, check=True,
            capture_output=True,
        )  # fmt: skip
        yield inside
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def rows(ctx: BenchContext) -> list[Row]:
    """Doctor in a network namespace with nothing routed, then in one where IMDS is silent."""
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
        with silent_imds_netns() as inside:
            # Doctor exits 0 (IMDS unreachable even by root: off EC2), after the timeouts.
            waited = subprocess.run([*inside, *args], capture_output=True, text=True, check=False)
            assert waited.returncode == 0, waited.stdout
            assert f"{IMDS_IPV4}:80 timed out" in waited.stdout, waited.stdout  # the worst case
            silent = [time_process([*inside, *args]) for _ in range(RUNS // 2)]
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
            "`kmskeys doctor` where IMDS never answers (own netns: each probe times out, 0.5 s)",
            value=_shown(silent),
            baseline=f"floor {bare.describe()}",
            ratio=f"max {max(silent) * 1000:.0f} ms",
            budget=f"< {BUDGET_S:.0f} s",
            ok=max(silent) < BUDGET_S,
        ),
    ]
