"""Fleet row: Secrets Manager calls per rotation for 100 hosts x 5 uids, from the simulator.

Simulated, not measured: a fleet cannot run on one machine. The model is docs/scale.md's
rotation case (scripts/fleet_sim.py, with scripts/fleet_rotation.py): a rotation event fanned
out by Run Command, each host's flush, then each uid's next request. The baseline is the same
fleet without the host cache, in the same run. The model is the resolver's: the first uid's
miss after the flush refreshes the host-cache entry (resolver/awssource.py, one entry per
secret whatever field each uid asks), the others wait for it on the entry's refresh lock (at
most 1 s, `hostcache.REFRESH_WAIT`) and hit. The one-call-per-host claim for a single host is
measured by the terraform tier (tests/terraform/test_rotation_document.py: a real secret rotated
with PutSecretValue, root and another uid re-resolve after the flush document, one
GetSecretValue for the host; the same for a parameter and a kms: blob).

Works alone as `python -m tests.bench.fleet` as well as from `python -m tests.bench`.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from scripts import fleet_sim
from tests.bench.common import BenchContext, Row, print_rows, row

HOSTS = 100
UIDS = 5
SEED = fleet_sim.SEED


def rows(ctx: BenchContext) -> list[Row]:
    """Calls per rotation with and without the host cache; the peak with MaxConcurrency 10%."""
    del ctx  # nothing to set up: the row is computed
    model = fleet_sim.fleet_rotation
    fleet = model.Rotation(hosts=HOSTS, uids=UIDS, concurrency_pct=10)
    cached = model.simulate(fleet, SEED)
    alone = model.simulate(replace(fleet, host_cache=False), SEED)
    at_once = model.simulate(replace(fleet, concurrency_pct=None), SEED)
    calls, baseline = len(cached.calls), len(alone.calls)
    return [
        row(
            f"fleet rotation (simulated): {HOSTS} hosts x {UIDS} uids, Secrets Manager calls "
            "per rotation with the host cache",
            value=f"{calls} ({cached.per_host:.2f} per host)",
            baseline=f"{baseline} without the host cache ({alone.per_host:.2f} per host)",
            ratio=f"{baseline / calls:.1f}x fewer",
            budget="one per host",
            ok=calls == HOSTS,
        ),
        row(
            f"fleet rotation (simulated): peak GetSecretValue /s, MaxConcurrency 10% vs every "
            f"host at once ({HOSTS} hosts)",
            value=f"{cached.peak}/s, every uid has the new value after {cached.done:.0f} s",
            baseline=f"{at_once.peak}/s, after {at_once.done:.0f} s",
            ratio=f"{at_once.peak / cached.peak:.1f}x lower peak",
            budget=f"< Parameter Store's {model.PARAMETER_STORE_TPS}/s",
            ok=cached.peak < model.PARAMETER_STORE_TPS,
        ),
    ]


def main() -> int:
    """Print the rows (the module run alone)."""
    return print_rows(rows(BenchContext(tmp=Path("."))))


if __name__ == "__main__":
    sys.exit(main())
