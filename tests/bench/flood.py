"""Hostile-flood row: one uid fires 200 concurrent upcalls; what does it cost the host?

The attacker (uid nobody, through the suite's requester helper) requests 200 distinct names at
once, each with a valid blob whose KMS answer the proxy holds back for a while, so that every
upcall it is allowed does expensive work. Meanwhile root (another uid) resolves fresh names one
after the other. Measured in one run:

- the peak of the summed RSS (and PSS) of the install's resolver: its daemon, every
  `kmskeys-resolver handle` process and every `kmskeys-gate`, sampled every 10 ms, against the
  budget of 500 MiB;
- root's miss latency p99 during the flood against the same measure with no flood.

The resolver daemon is on, as docs/resolver.md recommends: the gate's slots stop the flood at
`max_concurrent_per_uid` before the daemon spends anything, and each miss the daemon accepts
runs in a thread of its own, so root's misses do not wait behind the attacker's held calls.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from kmskeys import Keyring, get_secret
from tests.bench.common import BenchContext, Row, percentile, row
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy, ProxiedRequest
from tests.support.names import unique
from tests.support.requester import NOBODY, as_user
from tests.upcall.harness import RESOLVER, Install, flood, gate_pids, handler_pids, installed

FLOOD = 200
HOLD = 2.0  # seconds the proxy holds each of the attacker's KMS calls
VICTIM_RUNS = 20
RSS_BUDGET_MIB = 500
SECRET = b"kmst-flood-victim"


def _memory_kib(pids: list[int]) -> tuple[int, int]:
    """Summed RSS and PSS (KiB) of `pids`, skipping those that exit meanwhile."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def _resolver_pids(install: Install) -> list[int]:
    """The install's daemon, handlers and gates."""
    pids = handler_pids(install.config)
    if install.daemon is not None:
        pids.append(install.daemon.pid)
    return pids + gate_pids(install)


class Sampler:
    """Samples the install's resolver processes until stopped; keeps the peaks."""

    def __init__(self, install: Install) -> None:
        self.install = install
        self.peak_rss = self.peak_pss = self.peak_count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            pids = _resolver_pids(self.install)
            rss, pss = _memory_kib(pids)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_count = max(self.peak_count, len(pids))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _victim(install: Install, runs: int) -> list[float]:
    """Root's cold misses, one after the other: milliseconds each."""
    samples = []
    for _ in range(runs):
        name = unique("victim")
        blob = install.blob(SECRET, name)
        Keyring.join_session()
        start = time.perf_counter()
        assert get_secret(name, blob, prefix=install.prefix) == SECRET
        samples.append((time.perf_counter() - start) * 1000)
        install.log.collect()
        install.log.drain()
    return samples


def rows(ctx: BenchContext | None = None) -> list[Row]:
    """The hostile-flood row."""
    resolver = ctx.resolver if ctx is not None else RESOLVER
    with KmsEmulator() as emulator, KmsProxy(emulator.url) as proxy:
        key_arn = emulator.client().create_key(Description="kmst flood")["KeyMetadata"]["Arn"]
        with installed(
            emulator, proxy, key_arn, resolver=resolver, deadline=8, daemon=True
        ) as install:
            try:
                _victim(install, 3)  # page cache, bytecode
                unloaded = _victim(install, VICTIM_RUNS)
                names = [unique("kmst-flood") for _ in range(FLOOD)]
                blobs = {name: install.blob(b"kmst-flood-value", name) for name in names}

                def hold(request: ProxiedRequest) -> None:
                    if request.operation == "Decrypt" and b"kmst-flood" in request.body:
                        time.sleep(HOLD)

                proxy.set_fault(hold)
                proxy.reset_counts()
                outcome: list[object] = []
                with Sampler(install) as sampler:
                    attacker = threading.Thread(
                        target=lambda: outcome.append(
                            as_user(NOBODY, lambda: flood(install, names, blobs))
                        )
                    )
                    attacker.start()
                    loaded = _victim(install, VICTIM_RUNS)
                    attacker.join(120)
                    while handler_pids(install.config):
                        time.sleep(0.05)
                attacker_decrypts = proxy.count("Decrypt") - VICTIM_RUNS
            finally:
                proxy.set_fault(None)
                Keyring.join_session()
    (result,) = outcome
    ended = result.get("ok") if isinstance(result, dict) else None
    if ended is None:
        raise RuntimeError(f"the attacker (uid {NOBODY}) never ran its requests: {result}")
    p99_unloaded, p99_loaded = percentile(unloaded, 99), percentile(loaded, 99)
    rss_mib, pss_mib = sampler.peak_rss / 1024, sampler.peak_pss / 1024
    ratio = p99_loaded / p99_unloaded
    if ctx is not None:
        ctx.notes.append(
            f"hostile flood: {FLOOD} concurrent upcalls from uid {NOBODY} ended {ended}; "
            f"{attacker_decrypts} of them reached KMS; at most {sampler.peak_count} resolver "
            f"processes at once (the daemon, handlers, gates); peak PSS {pss_mib:.0f} MiB (RSS "
            "counts shared pages once per process)"
        )
    return [
        row(
            f"hostile flood: {FLOOD} concurrent upcalls from one uid, resolver daemon on",
            value=(
                f"resolver RSS peak {rss_mib:.0f} MiB; root's miss p99 {p99_loaded:.0f} ms "
                "during the flood"
            ),
            baseline=f"root's miss p99 {p99_unloaded:.0f} ms with no flood",
            ratio=f"{ratio:.1f}x p99",
            budget=f"RSS <= {RSS_BUDGET_MIB} MiB, p99 <= 2x",
            ok=rss_mib <= RSS_BUDGET_MIB and ratio <= 2.0,
        )
    ]


if __name__ == "__main__":
    for line in rows():
        print(line)
    sys.exit(0)
