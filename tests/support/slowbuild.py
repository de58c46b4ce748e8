"""Prerequisites too slow to build before the first test: built in background while the suite runs.

The older-glibc root (scripts/oldglibc-root.sh: Debian 11 with a CPython built there) costs
minutes of CPU, and only the tests of tests/packaging/test_oldglibc.py use it. Built before the
session, as the other prerequisites are, it held the whole of `make test` back. So once
collection shows a test that needs it, the session starts its make target at the lowest CPU
priority (the tiers keep the CPU they need), moves those tests to the end, and they wait for the
build. A failed build fails them with the tail of its output; nothing is skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

REPO = Path(__file__).resolve().parents[2]

# Test file (relative to the checkout) -> the make target it needs, a file under the checkout.
TARGETS = {"tests/packaging/test_oldglibc.py": ".oldglibc-root/.built"}
# How long a test may wait for its build: debootstrap plus a CPython build at nice 19 beside the
# suite on two CPUs, with room to spare.
WAIT = 1800


@dataclass
class Build:
    target: str
    process: subprocess.Popen[bytes]
    output: IO[bytes]


_builds: dict[str, Build] = {}


def target_of(item: pytest.Item) -> str | None:
    """The slow target ITEM's file needs, if any."""
    return TARGETS.get(str(Path(item.path).resolve().relative_to(REPO)))


def schedule(items: list[pytest.Item]) -> None:
    """Move the items that need a slow target to the end (their build has the longest to run),
    with room in their timeout to wait for it."""
    waiting = [item for item in items if target_of(item)]
    for item in waiting:
        item.add_marker(pytest.mark.timeout(WAIT + 300))
    items[:] = [item for item in items if not target_of(item)] + waiting


def start(items: list[pytest.Item]) -> None:
    """Start, in background, each slow target the collected items need and that is not built."""
    for target in sorted({t for item in items if (t := target_of(item))}):
        if target in _builds or (REPO / target).exists():
            continue
        # Closed by stop(), at the session's end.
        output = tempfile.TemporaryFile(prefix="kmskeys-slowbuild-")  # noqa: SIM115
        command = ["nice", "-n", "19", "make", "--no-print-directory", "-C", str(REPO), target]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        _builds[target] = Build(target, process, output)


def wait(target: str) -> None:
    """Return once TARGET is built; fail the test, with the build's last lines, if it was not."""
    build = _builds.get(target)
    if build is not None:
        started = time.monotonic()
        try:
            build.process.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`make {target}` still running after {WAIT} s", pytrace=False)
        if build.process.returncode != 0:
            build.output.seek(0)
            tail = build.output.read()[-3000:].decode(errors="replace")
            status = build.process.returncode
            pytest.fail(f"`make {target}` failed ({status}):\n{tail}", pytrace=False)
        waited = time.monotonic() - started
        if waited > 1:
            print(f"waited {waited:.0f} s for `make {target}` (built in background)")
    if not (REPO / target).exists():
        pytest.fail(f"{target} is missing: run `make {target}`", pytrace=False)


def stop() -> None:
    """At the session's end: a build still running is stopped (its target is left unbuilt, and
    the next session starts it again)."""
    for build in _builds.values():
        if build.process.poll() is None:
            os.killpg(build.process.pid, signal.SIGTERM)
            try:
                build.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(build.process.pid, signal.SIGKILL)
                build.process.wait()
        build.output.close()
    _builds.clear()
