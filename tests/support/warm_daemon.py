"""Run `kmskeys-resolver serve` (the warm daemon) for one install, and stop it afterwards."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RESOLVER = Path(sys.executable).parent / "kmskeys-resolver"


@contextmanager
def warm_daemon(
    config: Path, sock: Path, resolver: Path = RESOLVER
) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon for `config`, once its socket `sock` exists; SIGTERM and wait afterwards."""
    proc = subprocess.Popen(
        [str(resolver), "serve", "--config", str(config)], stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"warm daemon exited with {proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise RuntimeError("warm daemon did not create its socket within 15 s")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
