"""The wheel `make dist` builds, installed the way a host installs it: no compiler, no index.

One build for the session (conftest.py: scripts/dist.sh, the script `make dist` runs) and one
install for the module, into a fresh venv whose pip sees no index and no compiler: PATH holds
only the venv's bin, CC is unset, and the one dependency (cffi) comes from the wheelhouse
`make venv` downloaded (mk/packaging.mk). Then the installed client reads a key from the real
kernel keyring.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmskeys import Keyring
from tests.packaging.dist import ROOT, VENV, WHEELHOUSE, Dist
from tests.support.imports import SLOW_IMPORTS, imported_modules
from tests.support.names import unique, unique_prefix

pytestmark = pytest.mark.kernel

# manylinux2014: glibc 2.17, so that Amazon Linux 2 (glibc 2.26) installs the wheel
# (docs/packaging.md). keyutils 1.5 likewise: Amazon Linux 2 has keyutils-libs 1.5.8.
OLDEST_GLIBC = (2, 17)
OLDEST_KEYUTILS = (1, 5)
COMPILED = ("kmskeys/_keyutils_cffi.abi3.so", "kmskeys/_hitpath.abi3.so", "resolver/kmskeys-gate")
# The `kmskeys` command's programs (bin/, setup.py PROGRAMS): static, as the gate.
PROGRAMS = ("kmskeys-0.1.0.data/scripts/kmskeys", "kmskeys-0.1.0.data/scripts/kmskeys-unprotect")


@dataclass
class Installed:
    venv: Path
    env: dict[str, str]

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel in a fresh venv, installed with no index and no compiler."""
    if not list(WHEELHOUSE.glob("cffi-*.whl")):
        pytest.fail(f"no cffi wheel in {WHEELHOUSE}: run `make {WHEELHOUSE}/.downloaded`")
    venv = tmp_path_factory.mktemp("host") / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    env = {
        "PATH": str(venv / "bin"),  # no gcc, cc or ld on it
        "HOME": str(venv),
        "PIP_CONFIG_FILE": os.devnull,  # nor any index this machine's pip config names
        "PIP_NO_INDEX": "1",
    }
    for tool in ("gcc", "cc", "ld"):
        assert shutil.which(tool, path=env["PATH"]) is None, tool
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-index", "--only-binary=:all:", "--no-cache-dir", "--find-links",
         str(WHEELHOUSE), str(dist.wheel)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return Installed(venv, env)


@pytest.fixture
def cached(session_keyring: Keyring) -> Iterator[tuple[str, str, bytes]]:
    """A `user` key in the test's fresh session keyring, which the processes below inherit."""
    prefix, name, secret = unique_prefix(), unique(), unique("payload").encode()
    session_keyring.add_key("user", f"{prefix}:{name}", secret)
    yield prefix, name, secret


def needed_versions(path: Path) -> dict[str, set[str]]:
    """The symbol versions an ELF file needs, by library (its .gnu.version_r): what the dynamic
    loader checks against the host's libraries before it runs or loads the file."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.gnuversions import GNUVerNeedSection

    needed: dict[str, set[str]] = {}
    with path.open("rb") as file:
        for section in ELFFile(file).iter_sections():
            if isinstance(section, GNUVerNeedSection):
                for verneed, auxes in section.iter_versions():
                    names = needed.setdefault(verneed.name, set())
                    names.update(aux.name for aux in auxes)
    return needed


def newest(versions: set[str], stem: str) -> tuple[int, ...]:
    """The highest STEM_X.Y[.Z] of `versions` as a tuple, (0,) when there is none."""
    found = [tuple(int(n) for n in v.removeprefix(stem).split(".")) for v in versions]
    return max([(0,), *found])


def test_wheel_is_abi3_manylinux2014(dist: Dist) -> None:
    tags = dist.wheel.name.removesuffix(".whl").split("-")[2:]
    assert tags[:2] == ["cp311", "abi3"], tags
    machine = platform.machine()
    assert set(tags[2].split(".")) == {f"manylinux2014_{machine}", f"manylinux_2_17_{machine}"}


def test_no_compiled_file_needs_a_glibc_newer_than_2_17(dist: Dist, tmp_path: Path) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        wheel.extractall(tmp_path, members=COMPILED + PROGRAMS)
    for name in COMPILED + PROGRAMS:
        needed = needed_versions(tmp_path / name)
        glibc = {v for vs in needed.values() for v in vs if v.startswith("GLIBC_")}
        keyutils = needed.get("libkeyutils.so.1", set())
        assert newest(glibc, "GLIBC_") <= OLDEST_GLIBC, (name, sorted(glibc))
        assert newest(keyutils, "KEYUTILS_") <= OLDEST_KEYUTILS, (name, sorted(keyutils))
        # libc, the dynamic loader (for __tls_get_addr) and libkeyutils: nothing else.
        others = {lib for lib in needed if not lib.startswith("ld-linux")}
        assert others <= {"libc.so.6", "libkeyutils.so.1"}, (name, sorted(needed))
    # The gate and the command's programs are static: no libc symbol version, so no glibc floor
    # at all (setup.py GATE_LINK).
    for name in ("resolver/kmskeys-gate", *PROGRAMS):
        assert needed_versions(tmp_path / name) == {}, name
    # The cffi module links the host's libkeyutils (it is no manylinux library: not grafted);
    # the hit-path extension makes its three system calls itself and links no library but libc,
    # so that `import kmskeys` maps no other (kmskeys/_hitpath.c).
    assert "libkeyutils.so.1" in needed_versions(tmp_path / COMPILED[0])
    hitpath = {lib for lib in needed_versions(tmp_path / COMPILED[1]) if not lib.startswith("ld-")}
    assert hitpath == {"libc.so.6"}, (COMPILED[1], sorted(hitpath))


def test_auditwheel_finds_the_wheel_manylinux_2_17(dist: Dist) -> None:
    done = subprocess.run(
        [str(VENV / "bin" / "auditwheel"), "show", str(dist.wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    # libkeyutils is off the manylinux list, which `show` reports as "linux"; the repair keeps
    # it out of the wheel on purpose (scripts/dist.sh). glibc alone sets the tag:
    assert f'constrains the platform tag to "manylinux_2_17_{platform.machine()}"' in text, text


def test_wheel_holds_both_compiled_modules_the_script_data_and_license(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = set(wheel.namelist())
        meta = wheel.read("kmskeys-0.1.0.dist-info/METADATA").decode()
    for path in (
        "kmskeys/_keyutils_cffi.abi3.so",
        "kmskeys/_hitpath.abi3.so",
        "resolver/kmskeys-gate",
        "kmskeys/py.typed",
        "kmskeys/doctor/run.py",  # the subpackages: doctor, the low-level tier
        "kmskeys/lowlevel/__init__.py",
        "resolver/data/kmskeys-resolver.service",
        "resolver/data/kmskeys-firewall.service",
        *PROGRAMS,
        "kmskeys-0.1.0.data/scripts/kmskeys-py",
        "kmskeys-0.1.0.dist-info/licenses/LICENSE",
    ):
        assert path in names, path
    # libkeyutils stays the host's (docs/packaging.md): nothing grafted into the wheel.
    assert not [n for n in names if ".libs/" in n]
    assert "License-Expression: Apache-2.0" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert 'Requires-Dist: botocore>=1.34; extra == "resolver"' in requires
    assert not [r for r in requires if r.startswith("Requires-Dist: boto3") and "resolver" in r]
    assert 'Requires-Dist: boto3>=1.34; extra == "encrypt"' in requires
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_compiled_files_name_no_directory_of_the_build_machine(dist: Dist, tmp_path: Path) -> None:
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    with zipfile.ZipFile(dist.wheel) as wheel:
        wheel.extractall(tmp_path)
    compiled = [
        *tmp_path.glob("kmskeys/*.so"),
        tmp_path / "resolver" / "kmskeys-gate",
        *(tmp_path / name for name in PROGRAMS),
    ]
    assert len(compiled) == 5, compiled
    for path in compiled:
        with path.open("rb") as file:
            sections = ELFFile(file).iter_sections()
            tags = [
                tag.entry.d_tag
                for section in sections
                if isinstance(section, DynamicSection)
                for tag in section.iter_tags()
            ]
        assert "DT_RPATH" not in tags and "DT_RUNPATH" not in tags, path


def test_sdist_builds_the_wheel_and_warns_of_nothing_deprecated(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as sdist:
        names = set(sdist.getnames())
    for path in (
        "LICENSE",
        "bin/kmskeys.c",
        "bin/unprotect.c",
        "bin/common.c",
        "bin/kmskeys.h",
        "bin/kmskeys-py",
        "resolver/gate.c",
        "resolver/gate_daemon.c",
        "resolver/gate_request.c",
        "resolver/gate_subuid.c",
        "resolver/gate.h",
        "resolver/data/kmskeys-resolver.service",
    ):
        assert f"kmskeys-0.1.0/{path}" in names, path
    assert "deprecat" not in dist.log.lower(), dist.log


def test_installed_client_reads_the_kernel_keyring(
    installed: Installed, cached: tuple[str, str, bytes], tmp_path: Path
) -> None:
    prefix, name, secret = cached
    probe = (
        "import sys, kmskeys\n"
        f"sys.stdout.buffer.write(kmskeys.get_secret({name!r}, prefix={prefix!r}))\n"
        "sys.stderr.write(kmskeys.__file__)\n"
    )
    done = subprocess.run(
        [installed.python, "-c", probe],
        env=installed.env, cwd=tmp_path, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == secret
    assert done.stderr.decode().startswith(str(installed.venv))


def test_installed_command_gets_without_argparse_re_pathlib_or_enum(
    installed: Installed, cached: tuple[str, str, bytes], tmp_path: Path
) -> None:
    prefix, name, secret = cached
    command, python_cli = installed.venv / "bin" / "kmskeys", installed.venv / "bin" / "kmskeys-py"
    assert command.read_bytes()[:4] == b"\x7fELF"  # bin/kmskeys.c, compiled
    assert python_cli.read_text().splitlines()[0] == f"#!{installed.python}"
    for program in (command, python_cli):
        argv = [str(program), "get", name, "--prefix", prefix]
        done = subprocess.run(
            argv, env=installed.env, cwd=tmp_path, capture_output=True, timeout=30, check=False
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, secret, b"")
    # The command answers a cached get without starting Python at all.
    assert imported_modules([str(command), *argv[1:]], env=installed.env) == set()
    # A regular install: the whole Python CLI process, interpreter start included, imports none.
    modules = imported_modules(argv, env=installed.env)
    assert "kmskeys.cli" in modules
    assert not modules & SLOW_IMPORTS, sorted(modules & SLOW_IMPORTS)
