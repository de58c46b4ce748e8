"""CGI rows: throughput under a real lighttpd driven by wrk, and a CGI process's peak memory.

Three CGI scripts render the same page (a fingerprint of db-password) and differ only in how
they get the secret: examples/cgi/secret.py asks the kernel through kmskeys; the boto3 variant
builds a KMS client and decrypts per request, as a CGI without a host-side cache must; the
static floor reads the plaintext from a file (a baseline to measure against, not a way to keep
secrets). All of them talk to the same local KMS emulator; the boto3 variant gets explicit
credentials and endpoint, the cheapest way boto3 can be set up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kmskeys import Keyring
from tests.bench.common import BenchContext, Row, median, row
from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.lighttpd import EXAMPLE_CONF, Lighttpd
from tests.upcall.conftest import Install, installed

EXAMPLE_CGI = Path(__file__).resolve().parents[2] / "examples" / "cgi" / "secret.py"
EXAMPLE_PAGE = EXAMPLE_CGI.with_name("secret_page.py")  # the page secret.py imports
NAME = "db-password"
CONTEXT = {"kmskeys_name": NAME}
# wrk: connections to keep busy (2 per core saturates both), and seconds per variant in each
# round. Rounds interleave the variants (each round starting with another), and a ratio is the
# median over rounds of each round's ratio: a noisy neighbour's burst slows one round's variants
# alike, where totals over all rounds let one burst decide (0.76x and 1.43x in two runs of one
# build under load).
CONNECTIONS = 4
ROUNDS = 5
DURATION = {"kmskeys": 4, "boto3": 7, "static": 4}
MEMORY_RUNS = 5
# docs/design.md, Budgets: the kmskeys CGI serves >= 0.95x the requests/s of the plaintext floor.
FLOOR_BUDGET = 0.95
# Not kmskeys.py: a script's own directory comes first on sys.path and would shadow the package.
SCRIPTS = {"kmskeys": "secret.py", "boto3": "boto3_decrypt.py", "static": "static.py"}

# The page is secret.py's; only the way to the secret differs.
_PAGE = """
def respond(secret):
    fingerprint = hashlib.sha256(secret).hexdigest()[:16]
    sys.stdout.write(
        "Status: 200 OK\\r\\nContent-Type: text/html; charset=utf-8\\r\\n\\r\\n"
        "<!doctype html><title>kmskeys CGI example</title>\\n"
        f'<p>sha256 <code id="fingerprint">{fingerprint}</code>, '
        f'<span id="size">{len(secret)}</span> bytes\\n'
    )
"""

# What a process without kmskeys must do for the secret: a boto3 client and a Decrypt, with its
# settings and blob read from `here` (shared with the fresh-process row in fresh.py).
BOTO3_DECRYPT = """
import json, os, boto3
with open(os.path.join(here, "boto3.json")) as f:
    conf = json.load(f)
with open(os.path.join(here, "db-password.bin"), "rb") as f:
    blob = f.read()
kms = boto3.client(
    "kms",
    region_name=conf["region"],
    endpoint_url=conf["endpoint_url"],
    aws_access_key_id=conf["access_key"],
    aws_secret_access_key=conf["secret_key"],
)
answer = kms.decrypt(CiphertextBlob=blob, EncryptionContext=conf["context"], KeyId=conf["key"])
"""

BOTO3_CGI = (
    '"""The CGI without kmskeys: a boto3 KMS client and a Decrypt on every request."""\n'
    "import hashlib, os, sys\n"
    + _PAGE
    + "here = os.path.dirname(os.path.abspath(__file__))\n"
    + BOTO3_DECRYPT
    + 'respond(answer["Plaintext"])\n'
)

STATIC_CGI = (
    '"""The floor: a CGI that reads the plaintext from a file (never do this with a secret)."""\n'
    "import hashlib, os, sys\n"
    + _PAGE
    + """
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "plain.txt"), "rb") as f:
    respond(f.read())
"""
)


@dataclass
class Stack:
    """The emulator, a resolver install serving db-password, and the same secret for boto3."""

    install: Install
    secret: bytes
    docroot: Path

    def env(self) -> dict[str, str]:
        """The environment a CGI gets from the example's lighttpd config."""
        return {
            "KMSKEYS_PREFIX": self.install.prefix,
            "KMSKEYS_SECRET": NAME,
            "PATH": os.environ.get("PATH", ""),
        }


@contextmanager
def stack(ctx: BenchContext) -> Iterator[Stack]:
    """Everything the CGI and fresh-process rows need, inside a fresh session keyring."""
    Keyring.join_session()  # lighttpd and every process started below share it
    emulator = KmsEmulator().start()
    proxy = KmsProxy(emulator.url).start()
    try:
        kms = emulator.client()
        key_arn = kms.create_key(Description="kmst bench")["KeyMetadata"]["Arn"]
        secret = secrets.token_urlsafe(24).encode()  # a random, bench-only 32-byte password
        with installed(emulator, proxy, key_arn, resolver=ctx.resolver, ttl=3600) as install:
            install.deploy(NAME, install.blob(secret, NAME))
            docroot = ctx.tmp / "cgi-www"
            docroot.mkdir(exist_ok=True)
            shutil.copy(EXAMPLE_CGI, docroot / SCRIPTS["kmskeys"])
            shutil.copy(EXAMPLE_PAGE, docroot / EXAMPLE_PAGE.name)
            # As a deployer would (examples/cgi/README.md): the CGI user may not write there.
            subprocess.run(
                [ctx.python, "-m", "compileall", "-q", str(docroot / EXAMPLE_PAGE.name)],
                check=True,
            )
            (docroot / SCRIPTS["boto3"]).write_text(BOTO3_CGI)
            (docroot / SCRIPTS["static"]).write_text(STATIC_CGI)
            (docroot / "plain.txt").write_bytes(secret)
            ciphertext = kms.encrypt(KeyId=key_arn, Plaintext=secret, EncryptionContext=CONTEXT)
            (docroot / "db-password.bin").write_bytes(ciphertext["CiphertextBlob"])
            conf = {
                "region": TEST_CREDENTIALS["AWS_REGION"],
                "endpoint_url": emulator.url,
                "access_key": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret_key": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                "context": CONTEXT,
                "key": key_arn,
            }
            (docroot / "boto3.json").write_text(json.dumps(conf))
            yield Stack(install, secret, docroot)
    finally:
        proxy.stop()
        emulator.stop()
        Keyring.session().clear()
        Keyring.join_session()


@dataclass
class WrkResult:
    """What wrk measured for one URL in one run."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float


@dataclass
class Throughput:
    """One variant over every round: total requests / total time, median p50 and p99."""

    runs: list[WrkResult]

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.runs)

    @property
    def rps(self) -> float:
        return self.requests / sum(r.seconds for r in self.runs)

    def describe(self) -> str:
        p50 = median([r.p50_ms for r in self.runs])
        p99 = median([r.p99_ms for r in self.runs])
        return f"{self.rps:.1f} req/s (p50 {p50:.0f} ms, p99 {p99:.0f} ms)"


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(url: str, seconds: int) -> WrkResult:
    """Drive url with wrk for `seconds`; every answer must be a 200."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed: apt-get install wrk")
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(CONNECTIONS),
            "-d",
            f"{seconds}s",
            "--timeout",
            "30s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests on {url}:\n{out}")
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if set(latency) != {"50", "99"}:
        raise RuntimeError(f"unexpected wrk output for {url}:\n{out}")
    done = re.search(r"(\d+) requests in ([\d.]+\w+),", out)
    if done is None:
        raise RuntimeError(f"unexpected wrk output for {url}:\n{out}")
    return WrkResult(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2)) / 1000,
        p50_ms=_ms(latency["50"]),
        p99_ms=_ms(latency["99"]),
    )


def _cgi_processes(web: Lighttpd) -> int:
    """How many processes of lighttpd's process group are not lighttpd: CGI scripts running."""
    leader = int((web.workdir / "lighttpd.pid").read_text())
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command may hold spaces: the fields after its closing ")" are fixed.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, pgrp = int(stat.parent.name), int(fields[2])
        count += pgrp == leader and pid != leader
    return count


def settle(web: Lighttpd, timeout: float = 120.0) -> None:
    """Wait until the CGI processes of the last run have finished: wrk stops sending, but the
    requests in flight (seconds each for boto3 on a loaded machine) still run, and the next
    variant's run would share the CPU with them."""
    deadline = time.monotonic() + timeout
    while _cgi_processes(web) and time.monotonic() < deadline:
        time.sleep(0.05)


def check_page(web: Lighttpd, script: str, secret: bytes) -> None:
    """One request to `script` must show secret's fingerprint (and warms the cache)."""
    status, body = web.fetch(f"/{script}")
    expected = hashlib.sha256(secret).hexdigest()[:16]
    if status != 200 or expected not in body:
        raise RuntimeError(f"{script}: HTTP {status}, page {body[:200]!r}; {web.log()}")


def paired(ours: Throughput, baseline: Throughput) -> tuple[float, str]:
    """The median over rounds of ours / baseline in req/s, and the rounds' range, shown."""
    ratios = [
        (a.requests / a.seconds) / (b.requests / b.seconds)
        for a, b in zip(ours.runs, baseline.runs, strict=True)
    ]
    return median(ratios), f"rounds {min(ratios):.2f}-{max(ratios):.2f}"


def throughput_rows(ctx: BenchContext, st: Stack) -> list[Row]:
    """kmskeys vs boto3 vs static under lighttpd + wrk."""
    web = Lighttpd(
        EXAMPLE_CONF, ctx.tmp / "lighttpd", docroot=st.docroot, python=ctx.python,
        prefix=st.install.prefix, secret=NAME,
    )  # fmt: skip
    results: dict[str, Throughput] = {variant: Throughput([]) for variant in DURATION}
    with web:
        for variant in DURATION:
            check_page(web, SCRIPTS[variant], st.secret)
        decrypts_before = st.install.decrypts()
        variants = list(DURATION)
        for turn in range(ROUNDS):
            for variant in variants[turn % 3 :] + variants[: turn % 3]:
                settle(web)
                url = f"{web.url}/{SCRIPTS[variant]}"
                results[variant].runs.append(wrk(url, DURATION[variant]))
        resolver_decrypts = st.install.decrypts() - decrypts_before
    kms, boto, static = results["kmskeys"], results["boto3"], results["static"]
    ratio, ratio_spread = paired(kms, boto)
    floor, floor_spread = paired(kms, static)
    ctx.notes.append(
        f"CGI under lighttpd, wrk {CONNECTIONS} connections, {ROUNDS} rounds: kmskeys "
        f"{kms.requests} requests with {resolver_decrypts} KMS Decrypt by the resolver; "
        f"boto3 {boto.requests} requests, one Decrypt each; static {static.requests} requests."
    )
    return [
        row(
            "CGI under lighttpd (wrk): req/s vs boto3 decrypt per request",
            value=kms.describe(),
            baseline=f"boto3 {boto.describe()}",
            ratio=f"{ratio:.1f}x (median of {ROUNDS} rounds, {ratio_spread})",
            budget="≥ 20x",
            ok=ratio >= 20 and resolver_decrypts == 0,
        ),
        row(
            "CGI under lighttpd (wrk): req/s vs the static floor",
            value=kms.describe(),
            baseline=(
                f"plaintext file {static.describe()}, itself {static.rps / boto.rps:.1f}x boto3"
            ),
            ratio=f"{floor:.2f}x (median of {ROUNDS} rounds, {floor_spread})",
            budget=f"≥ {FLOOR_BUDGET}x",
            ok=floor >= FLOOR_BUDGET,
        ),
    ]


def peak_rss_kib(argv: list[str], env: dict[str, str]) -> int:
    """Peak RSS of one run of argv, measured by GNU time.

    Not wait4() on our own child: Linux carries the parent's RSS high-water mark over fork and
    exec into the child's ru_maxrss, so every child of this (large) process would look large.
    GNU time is a small process that forks the command itself.
    """
    gnu_time = Path("/usr/bin/time")
    if not gnu_time.exists():
        raise RuntimeError("GNU time is not installed: apt-get install time")
    done = subprocess.run(
        [str(gnu_time), "-f", "%M", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr[-500:]}")
    return int(done.stderr.strip().splitlines()[-1])


def memory_row(ctx: BenchContext, st: Stack) -> Row:
    """Peak RSS of one CGI process: kmskeys vs boto3 (same CGI environment, run directly)."""
    env = {**st.env(), "GATEWAY_INTERFACE": "CGI/1.1", "REQUEST_METHOD": "GET"}
    rss: dict[str, list[int]] = {"kmskeys": [], "boto3": []}
    for _ in range(MEMORY_RUNS):
        for variant, samples in rss.items():
            samples.append(peak_rss_kib([ctx.python, str(st.docroot / SCRIPTS[variant])], env))
    kms, boto = median(rss["kmskeys"]) / 1024, median(rss["boto3"]) / 1024
    return row(
        "CGI process peak RSS",
        value=f"{kms:.1f} MiB",
        baseline=f"boto3 {boto:.1f} MiB",
        ratio=f"{kms / boto:.2f}x",
        budget="< boto3",
        ok=kms < boto,
    )


def rows(ctx: BenchContext) -> list[Row]:
    """The CGI rows, on one emulator and one resolver install."""
    started = time.monotonic()
    with stack(ctx) as st:
        out = throughput_rows(ctx, st)
        out.append(memory_row(ctx, st))
    ctx.notes.append(f"CGI rows took {time.monotonic() - started:.0f} s.")
    return out
