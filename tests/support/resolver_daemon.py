"""Run `kmskeys-resolver serve` (the resolver daemon) for one install, and stop it afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RESOLVER = Path(sys.executable).parent / "kmskeys-resolver"


@contextmanager
def socket_dir() -> Iterator[Path]:
    """A root-owned directory for the daemon's socket, like /run/kmskeys; removed after."""
    path = Path(tempfile.mkdtemp(prefix="kmst-daemon-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def resolver_daemon(
    config: Path, sock: Path, resolver: Path = RESOLVER
) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon for `config`, once its socket `sock` exists; SIGTERM and wait afterwards.

    It leads a session of its own, as under systemd: it weighs its own session in the scheduler
    (resolver/daemon.py claim_cpu_share), never the test's, which also runs the requesters."""
    proc = subprocess.Popen(
        [str(resolver), "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"resolver daemon exited with {proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise RuntimeError("resolver daemon did not create its socket within 30 s")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
