"""Rotation rows (issue 21, part 4): how long a rotation takes to reach a running program under
`kmskeys exec --watch`, and what the watch costs the secrets that did not change.

A program (SERVER) holds secret 1 of three in memory, read from its credential file at start
and on SIGHUP, and answers every connection on a unix socket with it. One rotation: the new
value is deployed by a source (below), then root's `kmskeys flush NAME` runs (the command the
SSM document runs on every host); the clock starts before the deploy and stops when the program
answers the new value. The baseline, in the same run: the same rotation, timed to the moment a
new process's `kmskeys get NAME` returns the new value. The two other secrets are never
rotated: the proxy counts the Decrypts and the resolver logs the upcalls made for each name.

A source is how a new value is deployed. `BlobSource` redeploys a `kms:` blob (encrypted
beforehand, as CI does); `SecretsManagerSource` calls PutSecretValue on the moto server, and
the program reads one field of the JSON secret (`sm:NAME#value`); `rows()` makes one pair of
rows per source.

Works alone as `python -m tests.bench.rotation` as well as from `python -m tests.bench`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from kmskeys import Keyring
from tests.bench.common import BenchContext, Row, median, print_rows, row
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy, ProxiedRequest
from tests.support.names import unique
from tests.upcall.harness import RESOLVER, Install
from tests.upcall.sources import SM_PATH, Sources, sources_installed

ROTATIONS = 5  # per --on-change action
INTERVAL = 2.0  # the watch's default (kmskeys/exec_cli.py)
IDLE_INTERVALS = 3
ACTIONS = ("signal:HUP", "restart")
# The program answers 1 byte for "no value yet" (between a restart's two processes).
SERVER = r"""
import os, signal, socket, sys
path, where = sys.argv[1], os.environ["CREDENTIALS_DIRECTORY"]
value = b""
def load(*_):
    global value
    with open(os.path.join(where, "secret"), "rb") as f:
        value = f.read()
load()
signal.signal(signal.SIGHUP, load)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
try:
    os.unlink(path)
except FileNotFoundError:
    pass
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(16)
while True:
    conn, _ = srv.accept()
    conn.sendall(value)
    conn.close()
"""


class Source(Protocol):
    """Where a secret's value is deployed from, for one kind of description prefix."""

    label: str  # shown in the row, e.g. "kms: blob redeploy"
    prefix: str  # the description prefix its names are asked for under
    selector: str  # what follows NAME in the description the program is given
    unit: str  # what its calls are called in the row ("KMS Decrypt")

    def name(self, stem: str) -> str:
        """A new unique NAME of this source's."""
        ...

    def prepare(self, name: str, value: bytes) -> Callable[[], None]:
        """Everything a deploy of `value` needs ahead of time; the returned call deploys it."""
        ...

    def called(self, request: ProxiedRequest) -> str | None:
        """The NAME a request to AWS is a call for, None when it is no call of this source."""
        ...


class BlobSource:
    """`kms:` secrets: a blob encrypted beforehand (CI), written over NAME.kms in blob_dir."""

    label = "kms: blob redeploy"
    selector = ""
    unit = "KMS Decrypt"

    def __init__(self, install: Install) -> None:
        self.install = install
        self.prefix = install.prefix

    def name(self, stem: str) -> str:
        return unique(stem)

    def prepare(self, name: str, value: bytes) -> Callable[[], None]:
        blob = self.install.blob(value, name)

        def deploy() -> None:
            self.install.deploy(name, blob)

        return deploy

    def called(self, request: ProxiedRequest) -> str | None:
        if request.operation != "Decrypt":
            return None
        return str(json.loads(request.body)["EncryptionContext"].get("kmskeys_name", ""))


class SecretsManagerSource:
    """`sm:` secrets: PutSecretValue of a JSON secret, whose one field the program reads."""

    label = "Secrets Manager PutSecretValue"
    selector = "#value"
    unit = "GetSecretValue"

    def __init__(self, sources: Sources) -> None:
        self.client = sources.sm()
        self.prefix = sources.sm_prefix

    def name(self, stem: str) -> str:
        return unique(f"sm{stem}")  # inside the install's allowlist (tests/upcall/sources.py)

    def prepare(self, name: str, value: bytes) -> Callable[[], None]:
        secret, text = f"{SM_PATH}{name}", json.dumps({"value": value.decode()})

        def deploy() -> None:
            try:
                self.client.put_secret_value(SecretId=secret, SecretString=text)
            except self.client.exceptions.ResourceNotFoundException:
                self.client.create_secret(Name=secret, SecretString=text)

        return deploy

    def called(self, request: ProxiedRequest) -> str | None:
        if request.operation != "GetSecretValue":
            return None
        return str(json.loads(request.body).get("SecretId", "")).removeprefix(SM_PATH)


def _ask(path: Path) -> bytes | None:
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(os.fspath(path))
            return conn.recv(65536)
    except OSError:
        return None  # restarting: no program listening for a moment


def _served(path: Path, value: bytes, since: float, timeout: float = 60.0) -> float:
    while _ask(path) != value:
        if time.monotonic() - since > timeout:
            raise AssertionError(f"the program did not serve the new value in {timeout} s")
        time.sleep(0.002)
    return time.monotonic() - since


def _flush(kmskeys: str, source: Source, name: str) -> None:
    argv = [kmskeys, "flush", name, "--prefix", source.prefix]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def _cpu_seconds(pid: int) -> float:
    # The first field of schedstat: nanoseconds on a CPU (/proc/PID/stat counts clock ticks).
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Measured:
    """One source's figures: latencies per action, the baseline, and the calls per name."""

    def __init__(self, rotated: str, untouched: list[str]) -> None:
        self.rotated, self.untouched = rotated, untouched
        self.latency: dict[str, list[float]] = {action: [] for action in ACTIONS}
        self.baseline: list[float] = []
        self.decrypts: dict[str, int] = {}
        self.upcalls: dict[str, int] = {}
        self.idle_calls = 0
        self.idle_cpu_ms_per_s = 0.0
        self.rss_mib = 0.0


def _measure(ctx_python: str, install: Install, source: Source, tmp: Path) -> Measured:
    kmskeys = str(Path(ctx_python).parent / "kmskeys")
    names = [source.name("rotated"), source.name("untouched"), source.name("untouched")]
    for name in names:
        source.prepare(name, unique("v0").encode())()
    out = Measured(names[0], names[1:])
    assert install.proxy is not None

    def count(request: ProxiedRequest) -> None:
        name = source.called(request)
        if name is not None:
            out.decrypts[name] = out.decrypts.get(name, 0) + 1

    refs = [name + source.selector for name in names]
    for action in ACTIONS:
        path = tmp / f"served-{action.split(':')[0]}.sock"
        argv = [kmskeys, "exec", "--prefix", source.prefix, "--watch", f"--on-change={action}"]
        argv += ["--holdoff", "1", "--file", f"secret={refs[0]}"]
        argv += [f"--file=other{i}={ref}" for i, ref in enumerate(refs[1:])]
        argv += ["--", ctx_python, "-c", SERVER, os.fspath(path)]
        with subprocess.Popen(argv, stderr=subprocess.PIPE) as watch:
            try:
                _served_any(path)
                if action == ACTIONS[0]:
                    _idle(install, watch.pid, out)
                install.proxy.set_fault(count)
                install.log.drain()
                for _ in range(ROTATIONS):
                    value = unique("vN").encode()
                    deploy = source.prepare(names[0], value)
                    start = time.monotonic()
                    deploy()
                    _flush(kmskeys, source, names[0])
                    out.latency[action].append(_served(path, value, start))
                    # Past the holdoff (each rotation is acted on at once), and at a random
                    # point of the poll's period, so that the samples spread over it.
                    time.sleep(random.uniform(1.2, 1.2 + INTERVAL))
                install.proxy.set_fault(None)
                for line in install.log.drain():
                    for name in names:
                        out.upcalls[name] = out.upcalls.get(name, 0) + (f" name={name} " in line)
            finally:
                install.proxy.set_fault(None)
                watch.send_signal(signal.SIGTERM)
                watch.communicate(timeout=30)
    for _ in range(ROTATIONS):
        value = unique("vN").encode()
        deploy = source.prepare(names[0], value)
        start = time.monotonic()
        deploy()
        _flush(kmskeys, source, names[0])
        got = subprocess.run(
            [kmskeys, "get", refs[0], "--prefix", source.prefix],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        out.baseline.append(time.monotonic() - start)
        assert got == value
    return out


def _served_any(path: Path) -> None:
    deadline = time.monotonic() + 60
    while _ask(path) in (None, b""):
        assert time.monotonic() < deadline, "the program under the watch never answered"
        time.sleep(0.01)


def _idle(install: Install, pid: int, out: Measured) -> None:
    """Calls and CPU of the watch parent over IDLE_INTERVALS polls with nothing changing."""
    assert install.proxy is not None
    install.proxy.reset_counts()
    install.log.drain()
    cpu = _cpu_seconds(pid)
    time.sleep(IDLE_INTERVALS * INTERVAL)
    out.idle_cpu_ms_per_s = (_cpu_seconds(pid) - cpu) * 1000 / (IDLE_INTERVALS * INTERVAL)
    out.idle_calls = install.proxy.count() + len(install.log.drain())
    out.rss_mib = _rss_mib(pid)


def _rows(source: Source, m: Measured) -> list[Row]:
    hup, restart = (m.latency[a] for a in ACTIONS)
    base = median(m.baseline)
    rotated, untouched = m.rotated, m.untouched
    spent = sum(m.decrypts.get(n, 0) + m.upcalls.get(n, 0) for n in untouched)
    rotations = ROTATIONS * len(ACTIONS)
    return [
        row(
            f"rotation latency ({source.label} + root's `kmskeys flush`) to the new value served "
            f"by a program under `kmskeys exec --watch --file` (interval {INTERVAL:g} s), "
            f"median / max of {ROTATIONS}",
            value=f"signal:HUP {median(hup):.2f} / {max(hup):.2f} s; restart "
            f"{median(restart):.2f} / {max(restart):.2f} s",
            baseline=f"{base:.2f} s to a new process's `kmskeys get` after the same flush",
            ratio=f"+{median(hup) - base:.2f} s (the poll: at most one interval)",
            budget="reported",
            ok=None,
        ),
        row(
            f"calls for untouched secrets ({len(untouched)} watched beside the rotated one, "
            f"{rotations} rotations) and an idle watch ({IDLE_INTERVALS} polls)",
            value=f"untouched: {spent} {source.unit} + upcalls; idle: {m.idle_calls}; watch "
            f"parent idle CPU {m.idle_cpu_ms_per_s:.2f} ms/s, RSS {m.rss_mib:.0f} MiB",
            baseline=f"rotated secret: {m.decrypts.get(rotated, 0)} {source.unit} for "
            f"{rotations} rotations",
            ratio=f"{spent + m.idle_calls} calls",
            budget="0 for untouched and idle",
            ok=spent == 0 and m.idle_calls == 0,
        ),
    ]


def rows(ctx: BenchContext | None = None) -> list[Row]:
    """The rotation rows, one pair per source."""
    python = ctx.python if ctx is not None else sys.executable
    resolver = ctx.resolver if ctx is not None else RESOLVER
    out: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="kmst-rotation-") as tmp,
        KmsEmulator() as emulator,
        KmsProxy(emulator.url) as proxy,
    ):
        key_arn = emulator.client().create_key(Description="kmst bench")["KeyMetadata"]["Arn"]
        with sources_installed(emulator, proxy, key_arn, resolver=resolver, deadline=8) as aws:
            install = aws.install
            Keyring.join_session()
            try:
                for source in (BlobSource(install), SecretsManagerSource(aws)):
                    out += _rows(source, _measure(python, install, source, Path(tmp)))
            finally:
                Keyring.join_session()
    return out


def main() -> int:
    """Print this module's rows."""
    return print_rows(rows(BenchContext(tmp=Path(tempfile.gettempdir()))))


if __name__ == "__main__":
    sys.exit(main())
