"""Host-cache row: KMS Decrypts over a compressed hour, without and with the host cache.

A simulated hour, compressed: 5 services (child processes, each in a session keyring of its
own) x 20 secrets, a 3 s ttl standing for 5 minutes, 12 periods. Every period each service asks
for every secret; every key has expired since its last request. Decrypts are counted by the
proxy, with the host cache off (each service pays for itself: 5 x 20 x 12) and on. Both runs go
through the resolver daemon, so that the only difference is the host cache. (The latency of a
miss the host cache answers is a row of tests/bench/miss.py, against the bare upcall.)

Works alone as `python -m tests.bench.hostcache` as well as from `python -m tests.bench`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from kmskeys import Key, Keyring
from tests.bench.common import BenchContext, Row, print_rows, row
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.names import unique
from tests.support.ttl import MIN_TTL
from tests.upcall.harness import RESOLVER, Install, installed

SERVICES = 5
SECRETS = 20
PERIODS = 12
TTL = MIN_TTL
# A period is the ttl plus a second: every key (timeout TTL, gone after at most TTL s) and every
# host-cache entry (fresh for TTL s) has expired when its secret is asked for again.
PERIOD = TTL + 1.0
SECRET = b"bench-hostcache-" + b"x" * 16


def _service(install: Install, names: list[str], go: int, done: int) -> None:
    """A child: one session keyring; per byte read from `go`, ask for every secret once."""
    code = 1
    try:
        Keyring.join_session()
        while os.read(go, 1):
            failures = 0
            for name in names:
                try:
                    Key.request(install.description(name), b"").read()
                except Exception:
                    failures += 1
            os.write(done, bytes([min(failures, 255)]))
        code = 0
    finally:
        os._exit(code)


def _simulated_hour(install: Install) -> tuple[int, int, float]:
    """(KMS Decrypts, failed requests, seconds) for SERVICES x SECRETS x PERIODS requests."""
    assert install.proxy is not None
    names = [unique("hour") for _ in range(SECRETS)]
    for name in names:
        install.deploy(name, install.blob(SECRET, name))
    children = []
    for _ in range(SERVICES):
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            # Not the parent's ends of the earlier services' pipes either: a service sees EOF
            # on `go` only once no process holds its write end.
            for fd in (go_w, done_r, *(f for _, *ends in children for f in ends)):
                os.close(fd)
            _service(install, names, go_r, done_w)
        os.close(go_r)
        os.close(done_w)
        children.append((pid, go_w, done_r))
    install.proxy.reset_counts()
    failed = 0
    start = time.monotonic()
    try:
        for period in range(PERIODS):
            time.sleep(max(0.0, start + period * PERIOD - time.monotonic()))
            for _, go_w, _ in children:
                os.write(go_w, b"g")  # the services run concurrently, as on a host
            for _, _, done_r in children:
                failed += os.read(done_r, 1)[0]
        took = time.monotonic() - start
    finally:
        for pid, go_w, done_r in children:
            os.close(go_w)
            os.close(done_r)
            os.waitpid(pid, 0)
        install.log.drain()
    return install.proxy.count("Decrypt"), failed, took


def rows(ctx: BenchContext | None = None) -> list[Row]:
    """KMS Decrypts per simulated hour without and with the host cache."""
    resolver = ctx.resolver if ctx is not None else RESOLVER
    hours: dict[bool, tuple[int, int, float]] = {}
    with KmsEmulator() as emulator, KmsProxy(emulator.url) as proxy:
        key_arn = emulator.client().create_key(Description="kmst bench")["KeyMetadata"]["Arn"]
        for host_cache in (True, False):
            with installed(
                emulator,
                proxy,
                key_arn,
                resolver=resolver,
                daemon=True,
                deadline=8,
                ttl=TTL,
                host_cache=host_cache,
                kms_rate_per_uid=1000,
                kms_burst_per_uid=100000,
                # The 5 services are 5 uids on a real host; here all run as root, so root's
                # 100 concurrent misses per period need the slots of 5 uids.
                max_concurrent_per_uid=SERVICES * SECRETS,
            ) as install:
                hours[host_cache] = _simulated_hour(install)
    requests = SERVICES * SECRETS * PERIODS
    (off, off_failed, off_took), (on, on_failed, on_took) = hours[False], hours[True]
    budget = SECRETS * PERIODS
    return [
        row(
            f"simulated hour ({PERIODS} periods of ttl {TTL} s, {SERVICES} session keyrings x "
            f"{SECRETS} secrets, resolver daemon): KMS Decrypt",
            value=f"{on} with the host cache ({on_failed} failed, {on_took:.0f} s)",
            baseline=f"{off} without it ({off_failed} failed of {requests}, {off_took:.0f} s)",
            ratio=f"{off / max(on, 1):.1f}x fewer KMS calls",
            budget=f"<= {budget} (from {requests})",
            ok=on <= budget and off == requests and not on_failed and not off_failed,
        ),
    ]


def main() -> int:
    """Print this module's rows."""
    with tempfile.TemporaryDirectory(prefix="kmst-bench-") as tmp:
        return print_rows(rows(BenchContext(tmp=Path(tmp))))


if __name__ == "__main__":
    sys.exit(main())
