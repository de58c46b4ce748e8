"""The wheel on a glibc older than 2.34: installed by pip and used in a Debian 11 root.

The stand-in (scripts/oldglibc-root.sh, `make .oldglibc-root/.built`, which the session builds in
background while the other tiers run: tests/support/slowbuild.py) is Debian 11 from Debian's
packages, glibc 2.31, with a CPython 3.11 built there. It is older than the glibc 2.34 the wheel
used to need, not as old as Amazon Linux 2's 2.26 or manylinux2014's 2.17: test_wheel.py checks
that no compiled file needs a symbol newer than 2.17. Here pip, running on that glibc, refuses a
manylinux_2_34 wheel and installs this one, whose modules then load there and read the kernel
keyring (the keyring is the kernel's, so the chroot shares the test's session keyring).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmskeys import Keyring
from tests.packaging.dist import ROOT, WHEELHOUSE, Dist
from tests.support import slowbuild
from tests.support.names import unique, unique_prefix

pytestmark = pytest.mark.kernel

OLD_ROOT = ROOT / ".oldglibc-root"
PYTHON = "/opt/python3.11/bin/python3.11"
# What the stand-in must be older than to stand for anything: the glibc the wheel needed before.
GLIBC_BEFORE = (2, 34)
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PIP_CONFIG_FILE": "/dev/null", "LC_ALL": "C"}


@dataclass
class Stage:
    """A directory inside the old root holding the wheels, and a venv made there."""

    outside: Path
    inside: str
    wheel: str

    @property
    def python(self) -> str:
        return f"{self.inside}/venv/bin/python"


def in_root(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """ARGV run in the old root (chroot), with a plain environment."""
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"  # found on this PATH, not ENV's
    return subprocess.run(
        [chroot, str(OLD_ROOT), *argv], env=ENV, capture_output=True, timeout=300, check=False
    )


def pip_install(stage: Stage, wheel: str) -> subprocess.CompletedProcess[bytes]:
    """pip, from its own wheel, installing WHEEL into the stage's venv from the stage alone."""
    pip = next(Path(stage.outside).glob("pip-*.whl")).name
    return in_root(
        stage.python, f"{stage.inside}/{pip}/pip", "install", "--no-index", "--no-cache-dir",
        "--disable-pip-version-check", "--find-links", stage.inside, f"{stage.inside}/{wheel}",
    )  # fmt: skip


@pytest.fixture(scope="module")
def stage(dist: Dist) -> Iterator[Stage]:
    slowbuild.wait(f"{OLD_ROOT.name}/.built")
    if not list(WHEELHOUSE.glob("pip-*.whl")):
        pytest.fail(f"no pip wheel in {WHEELHOUSE}: run `make {WHEELHOUSE}/.downloaded`")
    name = unique("wheel")
    outside = OLD_ROOT / "tmp" / name
    outside.mkdir(mode=0o755)
    try:
        for wheel in [dist.wheel, *WHEELHOUSE.glob("*.whl")]:
            shutil.copy(wheel, outside)
        # The same wheel as a manylinux_2_34 one, as `make dist` built it before.
        tags = dist.wheel.name.split("-")
        old = "-".join([*tags[:4], f"manylinux_2_34_{tags[4].rsplit('_', 1)[-1]}"])
        shutil.copy(dist.wheel, outside / old)
        made = in_root(PYTHON, "-m", "venv", "--without-pip", f"/tmp/{name}/venv")
        assert made.returncode == 0, made.stderr
        yield Stage(outside, f"/tmp/{name}", dist.wheel.name)
    finally:
        shutil.rmtree(outside, ignore_errors=True)


@pytest.fixture
def cached(session_keyring: Keyring) -> tuple[str, str, bytes]:
    """A `user` key in the test's fresh session keyring, which the chrooted processes inherit."""
    prefix, name, secret = unique_prefix(), unique(), unique("payload").encode()
    session_keyring.add_key("user", f"{prefix}:{name}", secret)
    return prefix, name, secret


def test_the_stand_in_has_a_glibc_older_than_2_34() -> None:
    slowbuild.wait(f"{OLD_ROOT.name}/.built")
    done = in_root("getconf", "GNU_LIBC_VERSION")
    match = re.fullmatch(rb"glibc (\d+)\.(\d+)\n", done.stdout)
    assert match, done.stdout + done.stderr
    assert (int(match[1]), int(match[2])) < GLIBC_BEFORE, done.stdout


def test_pip_there_refuses_a_manylinux_2_34_wheel(stage: Stage) -> None:
    old = next(stage.outside.glob("*manylinux_2_34_*.whl")).name
    done = pip_install(stage, old)
    assert done.returncode != 0
    assert b"is not a supported wheel on this platform" in done.stderr, done.stderr


def test_the_wheel_installs_there_and_reads_the_keyring(
    stage: Stage, cached: tuple[str, str, bytes]
) -> None:
    done = pip_install(stage, stage.wheel)
    assert done.returncode == 0, done.stdout + done.stderr
    prefix, name, secret = cached
    probe = (
        "import sys, kmskeys, kmskeys._hitpath, kmskeys._keyutils_cffi\n"
        f"sys.stdout.buffer.write(kmskeys.get_secret({name!r}, prefix={prefix!r}))\n"
    )
    read = in_root(stage.python, "-c", probe)
    assert (read.returncode, read.stdout) == (0, secret), read.stderr
    command = in_root(f"{stage.inside}/venv/bin/kmskeys", "get", name, "--prefix", prefix)
    assert (command.returncode, command.stdout, command.stderr) == (0, secret, b"")
    # The gate (static) runs there too: its usage line, on stderr, with status 2.
    gate = in_root(f"{stage.inside}/venv/lib/python3.11/site-packages/resolver/kmskeys-gate")
    assert gate.returncode == 2 and gate.stderr.startswith(b"usage: kmskeys-gate"), gate.stderr
