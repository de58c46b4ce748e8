"""What the packaging tier builds, once per session, in background: what `make dist` builds
(scripts/dist.sh: the sdist, the wheel, the Debian package), then the README's role venvs
installed from that wheel (tests/packaging/roles.py).

Both cost a minute or more of pip, auditwheel and dpkg-deb, and held the tier's first tests back
by as much. So once collection shows a test that needs them (the `dist` or `roles` fixture),
the session starts them in one thread at nice 10 (per thread on Linux, and inherited by what it
starts) while the tiers before this one run, and each fixture waits for its part. A failed build
fails the tests that need it, with its output; nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.environ import snapshot
from tests.support.names import unique

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
WHEELHOUSE = VENV / "wheelhouse"
# How long a fixture waits for its part: both builds at nice 10 beside the suite on two CPUs.
WAIT = 1200


@dataclass
class Dist:
    wheel: Path
    sdist: Path
    deb: Path
    log: str


def build_dist(out: Path) -> Dist:
    """The sdist, the wheel and the Debian package, as `make dist` builds them, into `out`."""
    if not list(WHEELHOUSE.glob("botocore-*.whl")):
        pytest.fail(f"no resolver wheels in {WHEELHOUSE}: run `make {WHEELHOUSE}/.downloaded`")
    done = subprocess.run(
        [str(ROOT / "scripts" / "dist.sh"), str(out)],
        cwd=ROOT,
        env={**snapshot(), "VENV": str(VENV), "WHEELHOUSE": str(WHEELHOUSE)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wheels, sdists, debs = (list(out.glob(glob)) for glob in ("*.whl", "*.tar.gz", "*.deb"))
    assert (len(wheels), len(sdists), len(debs)) == (1, 1, 1), (wheels, sdists, debs)
    return Dist(wheels[0], sdists[0], debs[0], done.stdout + done.stderr)


class Background:
    """The session's builds: one thread, started once, removed with the session."""

    def __init__(self) -> None:
        self.pool: ThreadPoolExecutor | None = None
        self.parts: dict[str, Future[Any]] = {}
        self.base: Path | None = None

    def start(self, items: list[pytest.Item]) -> None:
        """Start the parts the collected items' fixtures need, in the order they depend."""
        wanted = {n for item in items for n in getattr(item, "fixturenames", ())}
        if "roles" in wanted:
            wanted.add("dist")
        for part in ("dist", "roles"):
            if part in wanted:
                self._submit(part)

    def result(self, part: str) -> Any:
        """The part, once built (started now if collection did not); the build's failure."""
        return self._submit(part).result(timeout=WAIT)

    def stop(self) -> None:
        if self.pool is not None:
            for future in self.parts.values():
                future.cancel()
            self.pool.shutdown(wait=True)
            self.pool = None
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
        self.parts.clear()

    def _submit(self, part: str) -> Future[Any]:
        if part not in self.parts:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="packaging", initializer=_nice
                )
                self.base = Path(tempfile.mkdtemp(prefix=unique("packaging") + "-"))
            if part == "roles":
                self._submit("dist")  # one thread: the roles wait for the dist in its queue
            self.parts[part] = self.pool.submit(self._build, part)
        return self.parts[part]

    def _build(self, part: str) -> Any:
        assert self.base is not None
        out = self.base / part
        out.mkdir()
        if part == "dist":
            return build_dist(out)
        from tests.packaging.roles import install_roles

        return install_roles(out, self.parts["dist"].result())


def _nice() -> None:
    os.setpriority(os.PRIO_PROCESS, 0, 10)  # this thread, and what it starts


background = Background()
