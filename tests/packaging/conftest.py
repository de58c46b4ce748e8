"""What `make dist` builds, once for the packaging tests (scripts/dist.sh, into a temp dir)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
WHEELHOUSE = VENV / "wheelhouse"


@dataclass
class Dist:
    wheel: Path
    sdist: Path
    deb: Path
    log: str


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The sdist, the wheel and the Debian package, as `make dist` builds them."""
    if not list(WHEELHOUSE.glob("botocore-*.whl")):
        pytest.fail(f"no resolver wheels in {WHEELHOUSE}: run `make {WHEELHOUSE}/.downloaded`")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [str(ROOT / "scripts" / "dist.sh"), str(out)],
        cwd=ROOT,
        env={**os.environ, "VENV": str(VENV), "WHEELHOUSE": str(WHEELHOUSE)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wheels, sdists, debs = (list(out.glob(glob)) for glob in ("*.whl", "*.tar.gz", "*.deb"))
    assert (len(wheels), len(sdists), len(debs)) == (1, 1, 1), (wheels, sdists, debs)
    return Dist(wheels[0], sdists[0], debs[0], done.stdout + done.stderr)
