"""The README's Install table as commands: each role's pip commands, run by `sh` as written,
with `$wheel` naming the wheel this session built and only the venv paths (/opt/...) moved
below a temporary directory (tests/packaging/test_roles.py says what is checked)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.packaging.dist import ROOT, WHEELHOUSE, Dist

README = ROOT / "README.md"
ROLES = {
    "app": "an application on a host",
    "ci": "a CI job that encrypts",
    "root": "the host's root side",
    "dpapi": "an application protecting its own data",
}
# The README's venvs, and where this test puts them.
VENVS = {"/opt/app/venv": "app", "/opt/ci": "ci", "/opt/kmskeys": "root"}
URL_FORM = re.compile(r'`(pip install --only-binary=:all:\s+"kmskeys\[resolver\] @ (\S+)")`')


def install_section() -> str:
    text = README.read_text()
    return text[text.index("## Install\n") : text.index("## Usage\n")]


def pip_commands() -> dict[str, list[str]]:
    """Role -> the code spans of its Install row that run pip."""
    found: dict[str, list[str]] = {}
    for line in install_section().splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) < 4:
            continue
        role = next((key for key, says in ROLES.items() if cells[1].startswith(says)), None)
        pip = [span for span in re.findall(r"`([^`]+)`", cells[2]) if "pip " in span]
        if role is not None and pip:  # not the Debian package's row (tests/packaging/test_deb.py)
            found[role] = pip
    return found


class Roles:
    """The venvs of one install run, below `base`, and the environment the commands run in."""

    def __init__(self, base: Path, dist: Dist) -> None:
        self.base = base
        interpreter = Path(os.path.realpath(sys.executable)).parent  # python3, not the dev venv
        self.env = {
            "PATH": f"{interpreter}:/usr/bin:/bin",
            "HOME": str(base),
            "wheel": str(dist.wheel),
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(WHEELHOUSE),
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }

    def bin(self, role: str) -> Path:
        return self.base / role / "bin"

    def run(self, command: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """`command` from the README, by sh, with its /opt/... venvs moved below `base`."""
        for shown, role in VENVS.items():
            command = command.replace(shown, str(self.base / role))
        return subprocess.run(
            ["sh", "-c", command], env={**self.env, **extra}, cwd=self.base,
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip


def install_roles(base: Path, dist: Dist) -> Roles:
    """Every pip command of the Install table, run once; AssertionError naming a failed one."""
    made = Roles(base, dist)
    commands = pip_commands()
    assert sorted(commands) == sorted(ROLES), commands
    for role in ("app", "ci", "root", "dpapi"):  # dpapi adds to the app's venv
        assert commands[role], role
        for command in commands[role]:
            done = made.run(command)
            assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    return made
