"""Refresh-ahead row: a reader asking every 100 ms through 10 ttl periods never meets a miss.

A reader (a child process with a session keyring of its own, as a service has) asks for one
secret every 100 ms for PERIODS periods of a TTL s ttl, noting each answer's key serial and
time. A miss is an answer from a new key (its serial differs from the one before): the key had
expired and the read waited for an upcall. With `kmskeys-resolver refresh` running, the key is
renewed in place, so the serial never changes. The baseline is the same reader without the
refresher (BASELINE_PERIODS periods: its misses come once per period). KMS Decrypts are counted
by the proxy in front of the moto server: the refresher goes through the host cache, so at
most one per ttl period, plus the first miss.

Works alone as `python -m tests.bench.refresh` as well as from `python -m tests.bench`.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.common import BenchContext, Row, median, print_rows, row
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.names import unique
from tests.upcall.harness import RESOLVER, Install, installed
from tests.upcall.refreshing import purge_host_cache, refresher

TTL = 4
PERIODS = 10
BASELINE_PERIODS = 3
EVERY = 0.1
SECRET = b"bench-refresh-" + b"x" * 16


def _reader(install: Install, name: str, seconds: float, out: int) -> None:
    """In a child: read every EVERY s for `seconds`; write (serial, ms, error) per read."""
    code = 1
    try:
        from kmskeys import Key, Keyring, KmsKeysError

        Keyring.join_session()
        reads = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            try:
                key = Key.request(install.description(name), b"")
                ok = key.read() == SECRET
                reads.append((key.serial, (time.perf_counter() - start) * 1000, not ok))
            except KmsKeysError:
                reads.append((0, (time.perf_counter() - start) * 1000, True))
            time.sleep(max(0.0, EVERY - (time.perf_counter() - start)))
        os.write(out, json.dumps(reads).encode())
        code = 0
    finally:
        os._exit(code)


def _read(install: Install, periods: int) -> tuple[int, int, list[float], int]:
    """(misses after the first read, errors, each miss's ms, KMS Decrypts) of one reader."""
    assert install.proxy is not None
    name = unique("benchahead")
    install.deploy(name, install.blob(SECRET, name))
    install.proxy.reset_counts()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _reader(install, name, periods * TTL, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reads = json.loads(pipe.read() or b"[]")
    os.waitpid(pid, 0)
    install.log.drain()
    assert reads, "the reader reported nothing"
    pairs = itertools.pairwise(reads)
    misses = [ms for (before, _, _), (serial, ms, _) in pairs if serial != before]
    errors = sum(1 for _, _, failed in reads if failed)
    return len(misses), errors, misses, install.proxy.count("Decrypt")


def rows(ctx: BenchContext | None = None) -> list[Row]:
    """The refresh-ahead row: misses, errors and KMS calls with and without the refresher."""
    resolver = ctx.resolver if ctx is not None else RESOLVER
    with KmsEmulator() as emulator, KmsProxy(emulator.url) as proxy:
        key_arn = emulator.client().create_key(Description="kmst bench")["KeyMetadata"]["Arn"]
        with installed(
            emulator, proxy, key_arn, resolver=resolver, deadline=8, ttl=TTL, ttl_jitter=0
        ) as install:
            try:
                base = _read(install, BASELINE_PERIODS)
                with refresher(install, resolver):
                    ahead = _read(install, PERIODS)
            finally:
                purge_host_cache(install.prefix)
    misses, errors, _, decrypts = ahead
    base_misses, base_errors, base_ms, base_decrypts = base
    budget = PERIODS + 1
    return [
        row(
            f"a reader asking every {EVERY * 1000:.0f} ms through {PERIODS} ttl periods (ttl "
            f"{TTL} s), kmskeys-resolver refresh running: misses, errors, KMS Decrypt",
            value=f"{misses} misses, {errors} errors, {decrypts} Decrypt",
            baseline=(
                f"without refresh-ahead: {base_misses} misses in {BASELINE_PERIODS} periods "
                f"(p50 {median(base_ms) if base_ms else 0:.0f} ms each), {base_errors} errors, "
                f"{base_decrypts} Decrypt"
            ),
            ratio=f"{base_misses / BASELINE_PERIODS:.1f} misses per period -> {misses}",
            budget=f"0 misses, 0 errors, <= {budget} Decrypt (one per host per ttl)",
            ok=misses == 0 and errors == 0 and decrypts <= budget,
        )
    ]


def main() -> int:
    """Print this module's rows."""
    with tempfile.TemporaryDirectory(prefix="kmst-bench-") as tmp:
        return print_rows(rows(BenchContext(tmp=Path(tmp))))


if __name__ == "__main__":
    sys.exit(main())
