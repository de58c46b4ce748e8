"""Miss rows: request_key to payload against the bare upcall, and a herd of cold callers.

All measured in one sitting, interleaved round by round so that the shared machine's load falls
on every path alike:

- the floor: request_key -> /sbin/request-key -> a trivial C program that instantiates at once
  (tests/bench/instantiate.c, linked like the gate);
- the emulator's Decrypt: a warm botocore client's round trip to the same moto server, through
  the same counting proxy the resolver talks to;
- a miss through the resolver daemon that calls KMS, and one that the host cache answers (the
  same secret from another new session keyring): no interpreter starts on either;
- the cold handler (no daemon), reported, against a fresh process doing its own boto3 decrypt.

Runs its own moto server, counting proxy and resolver installs (removed afterwards), so it works
alone as `python -m tests.bench.miss` as well as from `python -m tests.bench`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmskeys import Key, Keyring
from tests.bench.common import BenchContext, Row, median, percentile, print_rows, row
from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.names import unique
from tests.support.request_key_rule import request_key_rule
from tests.upcall.harness import RESOLVER, Install, installed

MISS_RUNS = 40
BASELINE_RUNS = 15
HERD = 200
# docs/design.md, Budgets (issue 23): against the floor measured in the same run.
HOSTCACHE_FLOOR_RATIO = 3.0
KMS_MARGIN_MS = 3.0
SECRET = b"bench-secret-" + b"x" * 19
FLOOR_C = Path(__file__).with_name("instantiate.c")

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


def _timed(call: Callable[[], object]) -> float:
    """Milliseconds `call` takes."""
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def _fresh(description: str, callout: bytes | str) -> Callable[[], bytes]:
    """A request of `description` from a new session keyring: a miss unless the host cache has
    it. The keyring is joined before the clock starts."""
    Keyring.join_session()
    return lambda: Key.request(description, callout).read()


def _compile_floor(ctx: BenchContext) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler: apt-get install gcc")
    out = ctx.tmp / "kmst-instantiate"  # removed with the run's scratch directory
    # Linked as the gate is (setup.py GATE_LINK): the floor is not slowed by a dynamic loader.
    subprocess.run([cc, "-O2", "-static-pie", "-o", str(out), str(FLOOR_C)], check=True)
    out.parent.chmod(0o755)
    return out


class Warm:
    """A warm botocore client's Decrypt of one ciphertext, through the resolver's endpoint."""

    def __init__(self, install: Install) -> None:
        from botocore.session import Session

        assert install.proxy is not None
        name = unique("emulated")
        self.arn = install.key_arn
        self.context = {"kmskeys_name": name}
        self.blob = install.kms().encrypt(
            KeyId=self.arn, Plaintext=SECRET, EncryptionContext=self.context
        )["CiphertextBlob"]
        self.client = Session().create_client(
            "kms",
            region_name=TEST_CREDENTIALS["AWS_REGION"],
            endpoint_url=install.proxy.url,
            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def decrypt(self) -> None:
        """One Decrypt round trip."""
        answer = self.client.decrypt(
            CiphertextBlob=self.blob, EncryptionContext=self.context, KeyId=self.arn
        )
        assert answer["Plaintext"] == SECRET


def _daemon_round(served: Install, floor: str, warm: Warm, samples: dict[str, list[float]]) -> None:
    """One sample of each path measured against the daemon, back to back."""
    name = unique("miss")
    blob = served.blob(SECRET, name)
    samples["floor"].append(_timed(_fresh(f"{floor}:{unique('floor')}", b"")))
    samples["decrypt"].append(_timed(warm.decrypt))
    fetch = _fresh(served.description(name), blob)
    samples["kms"].append(_timed(lambda: _check(fetch())))
    fetch = _fresh(served.description(name), blob)
    samples["hostcache"].append(_timed(lambda: _check(fetch())))
    served.log.collect()  # an unread datagram socket fills after a few lines


def _check(value: bytes) -> None:
    assert value == SECRET


def _phases(lines: list[str], source: str | None = None) -> dict[str, float]:
    """Median milliseconds per phase from the resolver's `ms=... t=phase:ms,...` log fields of
    the lines of `source` (inline: a KMS call; hostcache), or all."""
    per_phase: dict[str, list[float]] = {}
    for line in lines:
        if source is not None and f" source={source} " not in line:
            continue
        total = re.search(r" ms=(\d+)", line)
        phases = re.search(r" t=([\w.:,]+)", line)
        if total:
            per_phase.setdefault("resolver", []).append(float(total.group(1)))
        if phases:
            for item in phases.group(1).split(","):
                key, _, value = item.partition(":")
                per_phase.setdefault(key, []).append(float(value))
    return {k: median(v) for k, v in per_phase.items()}


def _cold_samples(install: Install, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        name = unique("cold")
        blob = install.blob(SECRET, name)
        fetch = _fresh(install.description(name), blob)
        samples.append(_timed(lambda fetch=fetch: _check(fetch())))  # type: ignore[misc]
        install.log.collect()
    return samples


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


def _threads(count: int, call: Callable[[], object]) -> list[float]:
    """Run `call` in `count` threads released together; milliseconds each."""
    barrier = threading.Barrier(count)
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        elapsed = _timed(call)
        with lock:
            latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return latencies


def _herd(install: Install) -> tuple[int, int, float]:
    """(Decrypt calls, correct payloads, p99 ms) for HERD cold callers of one new secret."""
    assert install.proxy is not None
    name = unique("herd")
    blob = install.blob(SECRET, name)
    Keyring.join_session()
    install.proxy.reset_counts()
    correct: list[bool] = []

    def caller() -> None:
        try:
            ok = install.get(name, blob) == SECRET
        except Exception:
            ok = False
        correct.append(ok)  # list.append is atomic

    latencies = _threads(HERD, caller)
    return install.proxy.count("Decrypt"), sum(correct), percentile(latencies, 99)


def _boto3_herd(install: Install) -> tuple[int, float]:
    """(Decrypt calls, p99 ms) for HERD concurrent boto3 decrypts through the counting proxy:
    what HERD cold callers cost without the kernel cache, each doing its own Decrypt."""
    import boto3

    assert install.proxy is not None
    name = unique("boto3herd")
    encrypted = install.kms().encrypt(
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

    def caller() -> None:
        # The proxy drops some of 200 connections at once: its count shows how many got through.
        with contextlib.suppress(Exception):
            client.decrypt(
                CiphertextBlob=encrypted["CiphertextBlob"],
                EncryptionContext={"kmskeys_name": name},
                KeyId=install.key_arn,
            )

    latencies = _threads(HERD, caller)
    return install.proxy.count("Decrypt"), percentile(latencies, 99)


def _served(emulator: KmsEmulator, proxy: KmsProxy, arn: str, resolver: Path) -> Any:
    return installed(
        emulator,
        proxy,
        arn,
        resolver=resolver,
        daemon=True,
        deadline=8,
        kms_rate_per_uid=1000,
        kms_burst_per_uid=100000,
    )


def _measure(ctx: BenchContext | None) -> dict[str, Any]:
    python = ctx.python if ctx is not None else sys.executable
    # The resolver runs from the apps' install: under make bench the regular one, .venv-bench.
    resolver = ctx.resolver if ctx is not None else RESOLVER
    floor_program = _compile_floor(ctx)
    got: dict[str, Any] = {"samples": {k: [] for k in ("floor", "decrypt", "kms", "hostcache")}}
    with KmsEmulator() as emulator, KmsProxy(emulator.url) as proxy:
        arn = emulator.client().create_key(Description="kmst bench")["KeyMetadata"]["Arn"]
        with (
            request_key_rule(f"{floor_program} %k") as floor,
            _served(emulator, proxy, arn, resolver) as served,
        ):
            try:
                warm = Warm(served)
                scratch: dict[str, list[float]] = {k: [] for k in got["samples"]}
                for _ in range(3):  # the page cache, the daemon's first call
                    _daemon_round(served, floor, warm, scratch)
                served.log.drain()
                for _ in range(MISS_RUNS):
                    _daemon_round(served, floor, warm, got["samples"])
                lines = served.log.drain()
                got["kms_phases"] = _phases(lines, "inline")
                got["hostcache_phases"] = _phases(lines, "hostcache")
                got["herd"] = _herd(served)
            finally:
                Keyring.join_session()
        with installed(emulator, proxy, arn, resolver=resolver, daemon=False, deadline=8) as cold:
            try:
                _cold_samples(cold, 3)
                cold.log.drain()
                got["cold"] = _cold_samples(cold, MISS_RUNS)
                got["cold_phases"] = _phases(cold.log.drain())
                got["baseline"] = _baseline_samples(cold, python)
                got["boto3_herd"] = _boto3_herd(cold)
            finally:
                Keyring.join_session()
    return got


def _phases_row(label: str, phases: dict[str, float]) -> Row:
    shown = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
    return row(
        f"miss, {label}: median ms per phase (the resolver's own log line)",
        value=shown,
        baseline="-",
        ratio="-",
        budget="none",
        ok=None,
    )


def rows(ctx: BenchContext | None = None) -> list[Row]:
    """The floor, the daemon's misses against it, the cold handler and the herd."""
    if ctx is not None:
        ctx.notes.append(f"misses run {ctx.resolver.parent.parent.name}/bin/kmskeys-resolver")
    got = _measure(ctx)
    samples = got["samples"]
    floor, decrypt = median(samples["floor"]), median(samples["decrypt"])
    kms, hostcache = median(samples["kms"]), median(samples["hostcache"])
    cold, base = median(got["cold"]), median(got["baseline"])
    kms_budget = floor + decrypt + KMS_MARGIN_MS
    decrypts, correct, herd_p99 = got["herd"]
    boto3_decrypts, boto3_p99 = got["boto3_herd"]

    def spread(key: str) -> str:
        return f"p50 {median(samples[key]):.2f} / p95 {percentile(samples[key], 95):.2f} ms"

    return [
        row(
            "bare upcall: request_key -> /sbin/request-key -> a C program that instantiates at "
            f"once, {MISS_RUNS} new session keyrings",
            value=spread("floor"),
            baseline="-",
            ratio="1.0x (the floor)",
            budget="none (the floor)",
            ok=None,
        ),
        row(
            "the emulator's Decrypt: a warm botocore client, through the same proxy",
            value=spread("decrypt"),
            baseline="-",
            ratio="-",
            budget="none (a baseline)",
            ok=None,
        ),
        row(
            "miss answered by the host cache, through the resolver daemon (no interpreter "
            "starts): request_key to payload",
            value=spread("hostcache"),
            baseline=f"floor {floor:.2f} ms",
            ratio=f"{hostcache / floor:.1f}x the floor",
            budget=f"p50 <= {HOSTCACHE_FLOOR_RATIO:.0f}x the floor",
            ok=hostcache <= HOSTCACHE_FLOOR_RATIO * floor,
        ),
        row(
            "miss that calls KMS, through the resolver daemon: request_key to payload",
            value=spread("kms"),
            baseline=f"floor {floor:.2f} + Decrypt {decrypt:.2f} ms",
            ratio=f"+{kms - floor - decrypt:.1f} ms over both",
            budget=f"p50 <= floor + Decrypt + {KMS_MARGIN_MS:.0f} ms = {kms_budget:.1f} ms",
            ok=kms <= kms_budget,
        ),
        _phases_row("resolver daemon, KMS", got["kms_phases"]),
        _phases_row("resolver daemon, host cache", got["hostcache_phases"]),
        row(
            f"miss, cold handler (no daemon): request_key to payload, over {MISS_RUNS} requests",
            value=f"p50 {cold:.0f} / p95 {percentile(got['cold'], 95):.0f} ms",
            baseline=f"{base:.0f} ms (fresh `python -c 'import boto3; decrypt'`)",
            ratio=f"{base / cold:.1f}x faster; {cold / floor:.0f}x the floor",
            budget="reported",
            ok=None,
        ),
        _phases_row("cold handler", got["cold_phases"]),
        row(
            f"herd: {HERD} concurrent cold callers, through the resolver daemon",
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
        os.chmod(tmp, 0o755)
        return print_rows(rows(BenchContext(tmp=Path(tmp))))


if __name__ == "__main__":
    sys.exit(main())
