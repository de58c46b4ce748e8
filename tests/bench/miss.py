"""Miss rows: upcall -> resolver -> KMS -> instantiate, and a herd of cold callers.

Runs its own moto server, counting proxy and resolver install (removed afterwards), so it works
alone as `python -m tests.bench.miss` as well as from `python -m tests.bench`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kmskeys import Keyring
from tests.bench.common import BenchContext, Row, median, percentile, print_rows, row
from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.names import unique
from tests.support.warm_daemon import warm_daemon
from tests.upcall.harness import RESOLVER, Install, installed

MISS_RUNS = 40
BASELINE_RUNS = 15
HERD = 200
MISS_BUDGET_MS = 60.0
SECRET = b"bench-secret-" + b"x" * 19

# A fresh process doing its own boto3 decrypt: what every miss would cost without kmskeys.
BASELINE = """
import base64, json, sys
import boto3
a = json.loads(sys.stdin.read())
c = boto3.client("kms", endpoint_url=a["url"], region_name=a["region"])
ct = base64.b64decode(a["ct"])
out = c.decrypt(CiphertextBlob=ct, EncryptionContext=a["ctx"], KeyId=a["arn"])
assert out["Plaintext"]
"""


def _miss_samples(install: Install, runs: int) -> list[float]:
    names = [unique("miss") for _ in range(runs)]
    blobs = [install.blob(SECRET, name) for name in names]
    install.log.drain()
    samples = []
    for name, blob in zip(names, blobs, strict=True):
        Keyring.join_session()  # cold: a fresh session keyring for every request
        start = time.perf_counter()
        value = install.get(name, blob)
        samples.append((time.perf_counter() - start) * 1000)
        assert value == SECRET
        # Collect the log line now: an unread datagram socket fills after a few lines.
        install.log.collect()
    return samples


def _phases(lines: list[str]) -> dict[str, float]:
    """Median milliseconds per phase from the resolver's `ms=... t=phase:ms,...` log fields."""
    per_phase: dict[str, list[float]] = {}
    for line in lines:
        total = re.search(r" ms=(\d+)", line)
        phases = re.search(r" t=([\w.:,]+)", line)
        if total:
            per_phase.setdefault("handler", []).append(float(total.group(1)))
        if phases:
            for item in phases.group(1).split(","):
                key, _, value = item.partition(":")
                per_phase.setdefault(key, []).append(float(value))
    return {k: median(v) for k, v in per_phase.items()}


def _baseline_samples(install: Install, python: str) -> list[float]:
    name = unique("baseline")
    kms = install.kms()
    encrypted = kms.encrypt(
        KeyId=install.key_arn, Plaintext=SECRET, EncryptionContext={"kmskeys_name": name}
    )
    payload = json.dumps(
        {
            "url": install.emulator.url,
            "region": TEST_CREDENTIALS["AWS_REGION"],
            "ct": base64.b64encode(encrypted["CiphertextBlob"]).decode(),
            "ctx": {"kmskeys_name": name},
            "arn": install.key_arn,
        }
    )
    env = {**os.environ, **TEST_CREDENTIALS}
    samples = []
    for _ in range(BASELINE_RUNS):
        start = time.perf_counter()
        subprocess.run(
            [python, "-c", BASELINE], input=payload.encode(), env=env, check=True, timeout=60
        )
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _herd(install: Install) -> tuple[int, int, float]:
    """(Decrypt calls, correct payloads, p99 ms) for HERD cold callers of one new secret."""
    assert install.proxy is not None
    name = unique("herd")
    blob = install.blob(SECRET, name)
    Keyring.join_session()
    install.proxy.reset_counts()
    barrier = threading.Barrier(HERD)
    latencies: list[float] = []
    correct = 0
    lock = threading.Lock()

    def caller() -> None:
        nonlocal correct
        barrier.wait()
        start = time.perf_counter()
        try:
            ok = install.get(name, blob) == SECRET
        except Exception:
            ok = False
        elapsed = (time.perf_counter() - start) * 1000
        with lock:
            latencies.append(elapsed)
            correct += ok

    threads = [threading.Thread(target=caller) for _ in range(HERD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return install.proxy.count("Decrypt"), correct, percentile(latencies, 99)


def _boto3_herd(install: Install) -> tuple[int, float]:
    """(Decrypt calls, p99 ms) for HERD concurrent boto3 decrypts through the counting proxy.

    The herd's baseline, measured: what HERD cold callers cost without the kernel cache, each
    doing its own Decrypt (threads of one process sharing a client, the cheapest way).
    """
    import boto3

    assert install.proxy is not None
    name = unique("boto3herd")
    kms = install.kms()
    encrypted = kms.encrypt(
        KeyId=install.key_arn, Plaintext=SECRET, EncryptionContext={"kmskeys_name": name}
    )
    client = boto3.client(
        "kms",
        endpoint_url=install.proxy.url,
        region_name=TEST_CREDENTIALS["AWS_REGION"],
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    install.proxy.reset_counts()
    barrier = threading.Barrier(HERD)
    latencies: list[float] = []
    lock = threading.Lock()

    def caller() -> None:
        barrier.wait()
        start = time.perf_counter()
        answer = client.decrypt(
            CiphertextBlob=encrypted["CiphertextBlob"],
            EncryptionContext={"kmskeys_name": name},
            KeyId=install.key_arn,
        )
        elapsed = (time.perf_counter() - start) * 1000
        assert answer["Plaintext"] == SECRET
        with lock:
            latencies.append(elapsed)

    threads = [threading.Thread(target=caller) for _ in range(HERD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return install.proxy.count("Decrypt"), percentile(latencies, 99)


def _miss_row(label: str, samples: list[float], base50: float) -> Row:
    p50, p95 = median(samples), percentile(samples, 95)
    return row(
        f"miss, {label}: request_key to payload, p50 / p95 over {MISS_RUNS} cold requests",
        value=f"{p50:.0f} / {p95:.0f} ms",
        baseline=f"{base50:.0f} ms (fresh `python -c 'import boto3; decrypt'`)",
        ratio=f"{base50 / p50:.1f}x faster",
        budget=f"p50 <= {MISS_BUDGET_MS:.0f} ms",
        ok=p50 <= MISS_BUDGET_MS,
    )


def _phases_row(label: str, phases: dict[str, float]) -> Row:
    shown = ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
    return row(
        f"miss, {label}: median ms per phase",
        value=shown,
        baseline="-",
        ratio="-",
        budget="none",
        ok=None,
    )


def rows(ctx: BenchContext | None = None) -> list[Row]:
    """Miss latency (cold handler and warm daemon) against a fresh-process boto3 decrypt, the
    phases of each, and the herd."""
    python = ctx.python if ctx is not None else sys.executable
    # The resolver runs from the apps' install: under make bench the regular one, .venv-bench.
    resolver = ctx.resolver if ctx is not None else RESOLVER
    if ctx is not None:
        ctx.notes.append(f"misses run {resolver.parent.parent.name}/bin/{resolver.name}")
    with KmsEmulator() as emulator, KmsProxy(emulator.url) as proxy:
        key_arn = emulator.client().create_key(Description="kmst bench")["KeyMetadata"]["Arn"]
        with installed(emulator, proxy, key_arn, resolver=resolver, deadline=8) as install:
            try:
                _miss_samples(install, 3)  # warm the page cache and bytecode, not the kernel cache
                cold = _miss_samples(install, MISS_RUNS)
                cold_phases = _phases(install.log.drain())
                baseline = _baseline_samples(install, python)
                decrypts, correct, herd_p99 = _herd(install)
                boto3_decrypts, boto3_p99 = _boto3_herd(install)
            finally:
                Keyring.join_session()
        with tempfile.TemporaryDirectory(prefix="kmst-warm-") as run:
            os.chmod(run, 0o755)
            sock = Path(run) / "resolver.sock"
            with (
                installed(
                    emulator, proxy, key_arn, resolver=resolver, deadline=8, warm_socket=sock
                ) as install,
                warm_daemon(install.config, sock, resolver),
            ):
                try:
                    _miss_samples(install, 3)  # the daemon builds its client on first use
                    warm = _miss_samples(install, MISS_RUNS)
                    warm_phases = _phases(install.log.drain())
                finally:
                    Keyring.join_session()
    base50 = median(baseline)
    return [
        _miss_row("cold handler (no daemon)", cold, base50),
        _phases_row("cold handler", cold_phases),
        _miss_row("warm daemon (kmskeys-resolver serve)", warm, base50),
        _phases_row("warm daemon", warm_phases),
        row(
            f"herd: {HERD} concurrent cold callers",
            value=f"{decrypts} KMS Decrypt, {correct}/{HERD} correct, p99 {herd_p99:.0f} ms",
            baseline=(
                f"{HERD} concurrent boto3 decrypts through the same proxy: {boto3_decrypts} KMS "
                f"Decrypt, p99 {boto3_p99:.0f} ms"
            ),
            ratio=f"{boto3_decrypts / max(decrypts, 1):.0f}x fewer KMS calls",
            budget=f"1 Decrypt, {HERD} correct",
            ok=decrypts == 1 and correct == HERD,
        ),
    ]


def main() -> int:
    """Print this module's rows."""
    with tempfile.TemporaryDirectory(prefix="kmst-bench-") as tmp:
        return print_rows(rows(BenchContext(tmp=Path(tmp))))


if __name__ == "__main__":
    sys.exit(main())
