"""Hardening of the root side through the real upcall: findings F3, F5, F6 and F8-F10 of the
security review (docs/security.md), each with its regression test.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kmskeys import KeyNotFoundError, KeyRejectedError, TemporarilyUnavailableError
from kmskeys.blob import parse_blob
from tests.support.kms_proxy import ProxiedRequest
from tests.support.names import unique
from tests.support.requester import as_user
from tests.upcall.daemonpath import phases
from tests.upcall.harness import RESOLVER, Install, handler_pids, worker_pids

pytestmark = pytest.mark.upcall

# Phases of a request that loaded botocore or built a KMS client.
EXPENSIVE = {"import", "client", "decrypt"}
# Requests, each naming a region of its own, that the daemon must refuse without growing.
HOSTILE_REGIONS = 300


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


def _foreign_region_blob(install: Install, name: str, region: str) -> str:
    # A well-formed blob whose key ARN names a region (and so a key) the config does not list.
    blob = parse_blob(install.blob(b"kmst-hostile", name))
    assert blob.key_arn is not None
    parts = blob.key_arn.split(":")
    parts[3] = region
    return dataclasses.replace(blob, key_arn=":".join(parts)).to_text()


def test_hostile_regions_never_grow_the_daemon(extra_install: Any) -> None:
    with extra_install(daemon=True) as other:
        daemon = other.daemon
        assert daemon is not None
        name = unique("warmup")
        assert other.get(name, other.blob(b"kmst-warm", name)) == b"kmst-warm"  # one real client
        other.log.drain()
        before = _rss_kib(daemon.pid)
        other.proxy.reset_counts()  # type: ignore[union-attr]
        # Through the upcall: each refused before a client exists for its region, no KMS call.
        for i in range(HOSTILE_REGIONS):
            hostile = unique(f"hostile{i}")
            with pytest.raises(KeyRejectedError):
                other.get(hostile, _foreign_region_blob(other, hostile, f"kmst-fake-{i}"))
            other.log.collect()
        lines = other.log.drain()
        grown = _rss_kib(daemon.pid) - before
        assert len(lines) == HOSTILE_REGIONS, lines[-3:]
        assert all("key not allowed" in line for line in lines), lines[:3]
        assert not any(EXPENSIVE & _phases_or_none(line) for line in lines), lines[:3]
        assert grown <= 10 * 1024, f"daemon RSS grew by {grown} KiB over hostile requests"
        assert other.decrypts() == 0


def _phases_or_none(line: str) -> set[str]:
    return phases(line) if " t=" in line else set()


def test_cheap_refusals_never_load_botocore(resolver: Install) -> None:
    unknown, policy, foreign, garbled = (
        unique(stem) for stem in ("unknown", "nobodyonly", "foreignkey", "garbled")
    )
    cases: dict[str, tuple[type[Exception], Callable[[], object]]] = {
        # No blob deployed for the name.
        unknown: (KeyNotFoundError, lambda: resolver.get(unknown)),
        # The session config gives the nobodyonly names to nobody alone.
        policy: (KeyRejectedError, lambda: resolver.get(policy, resolver.blob(b"p", policy))),
        # A key (and region) the config does not list.
        foreign: (
            KeyRejectedError,
            lambda: resolver.get(foreign, _foreign_region_blob(resolver, foreign, "kmst-x")),
        ),
        garbled: (KeyRejectedError, lambda: resolver.get(garbled, "kmsk1:AAAA")),
    }
    for name, (error, request) in cases.items():
        with pytest.raises(error):
            request()
        line = resolver.log.wait_for(name)
        assert not EXPENSIVE & _phases_or_none(line), line
    assert resolver.decrypts() == 0


def test_a_uid_cannot_burn_the_kms_quota(extra_install: Any) -> None:
    with extra_install(kms_rate_per_uid=0.001, kms_burst_per_uid=3) as limited:
        limited.proxy.reset_counts()
        names = [unique(f"rate{i}") for i in range(5)]
        results = []
        for name in names:
            try:
                results.append(limited.get(name, limited.blob(b"kmst-rated", name)))
            except TemporarilyUnavailableError as exc:
                results.append(type(exc))
        assert results == [b"kmst-rated"] * 3 + [TemporarilyUnavailableError] * 2
        assert limited.decrypts() == 3
        for name in names[3:]:
            line = limited.log.wait_for(name)
            assert "over its KMS call rate" in line and "errno=EAGAIN" in line, line
        # Another uid has a bucket of its own.
        other = unique("rateother")
        text = limited.blob(b"kmst-other-uid", other)
        got = as_user("nobody", lambda: limited.get(other, text).decode())
        assert got == {"ok": "kmst-other-uid"}
        assert limited.decrypts() == 4


def test_an_inline_blob_never_shows_in_argv(resolver: Install) -> None:
    assert resolver.proxy is not None
    assert "%c" not in next(Path("/etc/request-key.d").glob(f"*{resolver.prefix}*")).read_text()
    name = unique("argv")
    text = resolver.blob(b"kmst-argv", name)
    seen_handler, seen_blob = threading.Event(), []
    release = threading.Event()

    def hold(request: ProxiedRequest) -> None:
        if request.operation == "Decrypt":
            # The handler is alive and waiting for KMS: read every process's argv now.
            if handler_pids(resolver.config):
                seen_handler.set()
            for entry in Path("/proc").iterdir():
                try:
                    argv = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if text[20:60].encode() in argv:
                    seen_blob.append(entry.name)
            release.set()

    resolver.proxy.set_fault(hold)
    assert resolver.get(name, text) == b"kmst-argv"
    assert release.is_set() and seen_handler.is_set()
    assert seen_blob == []


def test_a_readable_credentials_file_is_refused(extra_install: Any) -> None:
    with extra_install() as other:
        other.proxy.reset_counts()
        credentials = Path(other.settings["shared_credentials_file"])
        os.chmod(credentials, 0o644)
        name = unique("creds")
        with pytest.raises(KeyRejectedError):
            other.get(name, other.blob(b"kmst-creds", name))
        assert "readable by group or others" in other.log.wait_for(name)
        assert other.decrypts() == 0


@contextmanager
def _core_files_in(directory: Path) -> Iterator[None]:
    """Core dumps go to `directory` (kernel.core_pattern) for the block; restored after."""
    pattern = Path("/proc/sys/kernel/core_pattern")
    previous = pattern.read_text()
    pattern.write_text(f"{directory}/core.%p\n")
    try:
        yield
    finally:
        pattern.write_text(previous)


UNLIMITED_CORE = (
    "import resource, time; "
    "resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)); "
    "print('ready', flush=True); time.sleep(30)"
)


def test_a_crashed_handler_leaves_no_core_dump(extra_install: Any, tmp_path: Path) -> None:
    # The handler's own worker is crashed: an install without the daemon.
    with extra_install(daemon=False) as resolver:
        _crash_a_handler(resolver, tmp_path)


def _crash_a_handler(resolver: Install, tmp_path: Path) -> None:
    assert resolver.proxy is not None
    cores = tmp_path / "cores"
    cores.mkdir()
    name = unique("core")
    text = resolver.blob(b"kmst-core", name)
    looked: dict[str, object] = {}

    def crash(request: ProxiedRequest) -> None:
        # The worker has read the blob and waits for KMS: crash it as a bug in C would.
        if request.operation != "Decrypt" or looked:
            return
        workers = worker_pids(resolver.config)
        looked["workers"] = len(workers)
        for pid in workers:
            limits = Path(f"/proc/{pid}/limits").read_text()
            found = re.search(r"^Max core file size\s+(\S+)\s+(\S+)", limits, re.M)
            looked["limit"] = found.groups() if found else None
            os.kill(pid, signal.SIGSEGV)

    with _core_files_in(cores):
        # The set-up does write cores: a dumpable process crashing the same way leaves one.
        control = subprocess.Popen([sys.executable, "-c", UNLIMITED_CORE], stdout=subprocess.PIPE)
        assert control.stdout is not None and control.stdout.readline() == b"ready\n"
        control.send_signal(signal.SIGSEGV)
        control.wait()
        control.stdout.close()
        assert list(cores.iterdir()), "the control process left no core: the test is blind"
        for core in cores.iterdir():
            core.unlink()
        resolver.proxy.set_fault(crash)
        # The supervisor answers for the dead worker (EAGAIN) once it has been reaped, by which
        # time any core would have been written.
        with pytest.raises(TemporarilyUnavailableError):
            resolver.get(name, text)
        resolver.proxy.set_fault(None)
        assert "killed by signal SIGSEGV" in resolver.log.wait_for(name)
    assert looked == {"workers": 1, "limit": ("0", "0")}
    assert list(cores.iterdir()) == []
    assert resolver.get(name, text) == b"kmst-core"


def test_a_missing_dependency_is_loud_and_not_cached(extra_install: Any, tmp_path: Path) -> None:
    stub = tmp_path / "stub"
    (stub / "botocore").mkdir(parents=True)
    (stub / "botocore" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'botocore'\", name='botocore')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(stub)}
    refused = subprocess.run(
        [str(RESOLVER), "install", "--config", str(tmp_path / "r.toml")],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "botocore" in refused.stderr and "pip install 'kmskeys[resolver]'" in refused.stderr
    assert not (tmp_path / "r.toml").exists()
    # The handler is what a client-only environment breaks: an install without the daemon.
    with extra_install(daemon=False) as other:
        rule = next(Path("/etc/request-key.d").glob(f"*{other.prefix}*"))
        original = rule.read_text()
        # The same install, run the way a client-only environment would run it.
        rule.write_text(
            original.replace(f" {RESOLVER} ", f" /usr/bin/env PYTHONPATH={stub} {RESOLVER} ")
        )
        try:
            name = unique("nodeps")
            text = other.blob(b"kmst-nodeps", name)
            for _ in range(2):  # EAGAIN: never cached, the second request runs the handler too
                with pytest.raises(TemporarilyUnavailableError):
                    other.get(name, text)
                line = other.log.wait_for(name)
                assert line.startswith("<83>"), line  # authpriv.err
                assert "missing dependency botocore" in line and "errno=EAGAIN" in line, line
        finally:
            rule.write_text(original)


def test_a_crashed_daemon_leaves_no_core_dump(extra_install: Any, tmp_path: Path) -> None:
    cores = tmp_path / "cores"
    cores.mkdir()
    with _core_files_in(cores), extra_install(daemon=True) as other:
        daemon = other.daemon
        assert daemon is not None
        name = unique("warmcore")
        assert other.get(name, other.blob(b"kmst-warm-core", name)) == b"kmst-warm-core"
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()
        assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.M), limits
        daemon.send_signal(signal.SIGSEGV)
        assert daemon.wait(10) == -signal.SIGSEGV
    assert list(cores.iterdir()) == []
    # The systemd unit says so too, for a daemon started before any code of ours runs.
    unit = Path(__file__).resolve().parents[2] / "resolver" / "data" / "kmskeys-resolver.service"
    assert "\nLimitCORE=0\n" in unit.read_text()
