"""Every fix doctor prints, pasted in order until doctor is clean, gives back the original install.

Issue 26, points 6 to 8. A `--rules both` install (kms: and stored: from one rule file, one
config) is broken in each way the tests can make, doctor runs (in a network namespace of its
own, tests/upcall/test_doctor.py) for the kms prefix and for the stored prefix, with `--config`,
and from an app's environment that has kmskeys but no resolver. Each round pastes every fix doctor
printed, in order, into one root shell; when doctor is clean, the rule file, the install's record
and the config are what install made, byte for byte.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kmskeys.rules import RECORD_FILE, parse_record
from resolver.install import rule_path
from tests.stored.harness import StoredInstall, stored_installed
from tests.upcall.conftest import KMSKEYS
from tests.upcall.test_doctor import NO_COMMAND, _shell

pytestmark = pytest.mark.upcall

ROUNDS = 4


@pytest.fixture(scope="module")
def app_kmskeys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `kmskeys` in an app's environment: the client package, no resolver, no botocore."""
    root = tmp_path_factory.mktemp("appvenv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = root / "site"
    site.mkdir()
    repo = Path(__file__).resolve().parents[2]
    import _cffi_backend
    import cffi

    for source in (repo / "kmskeys", Path(cffi.__file__).parent):
        (site / source.name).symlink_to(source)
    backend = Path(_cffi_backend.__file__)
    (site / backend.name).symlink_to(backend)
    (next(venv.glob("lib/python*/site-packages")) / "kmst.pth").write_text(f"{site}\n")
    program = venv / "bin" / "kmskeys"
    program.write_text(
        f"#!{venv}/bin/python\nimport sys\nfrom kmskeys.cli import main\nsys.exit(main())\n"
    )
    program.chmod(0o755)
    for directory in (root, *root.parents):
        if directory == Path("/"):
            break
        os.chmod(directory, os.stat(directory).st_mode | 0o055)
    return program


def doctor(kmskeys: Path, *args: str) -> dict[str, Any]:
    """doctor --json's report, in a network namespace of its own."""
    argv = ["unshare", "--net", str(kmskeys), "doctor", *args, "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    try:
        found: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        raise AssertionError((done.stdout, done.stderr)) from None
    return found


def broken(found: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in found["findings"] if f["level"] in ("FAIL", "warn")]


def heal(kmskeys: Path, args: tuple[str, ...]) -> tuple[list[str], dict[str, Any]]:
    """Paste every fix doctor prints, in order, until it prints none: the fixes, the report."""
    pasted: list[str] = []
    for _ in range(ROUNDS):
        found = doctor(kmskeys, *args)
        fixes = [f["fix"] for f in broken(found) if f["fix"]]
        if not fixes:
            return pasted, found
        done = _shell("\n".join(fixes))
        assert done.returncode == 0, (fixes, done.stdout, done.stderr)
        pasted += fixes
    raise AssertionError(f"doctor still prints fixes after {ROUNDS} rounds: {pasted}")


@contextmanager
def both_install() -> Iterator[StoredInstall]:
    with stored_installed(rules="both") as install:
        yield install


def _state(install: StoredInstall) -> tuple[str, str, bytes]:
    record = Path(install.settings["state_dir"]) / RECORD_FILE
    return rule_path(install.prefix).read_text(), record.read_text(), install.config.read_bytes()


def _drop_line(path: Path, prefix: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(x for x in lines if not x.startswith(f"create user {prefix}:*")))


def _wrong_program(path: Path, prefix: str) -> None:
    text = path.read_text()
    line = next(x for x in text.splitlines() if x.startswith(f"create user {prefix}:*"))
    # The gate's `--` then a program that is not kmskeys-resolver: every miss fails.
    head, _, tail = line.partition(" -- ")
    wrong = f"{head} -- /bin/false {tail.split(' ', 1)[1]}"
    path.write_text(text.replace(line, wrong))


Breakage = Callable[[StoredInstall], None]
BREAKAGES: dict[str, Breakage] = {
    "rule missing": lambda i: rule_path(i.prefix).unlink(),
    "rule for the wrong program": lambda i: _wrong_program(rule_path(i.prefix), i.prefix),
    "stored rule missing": lambda i: _drop_line(rule_path(i.prefix), i.stored_prefix),
    "stored rule for the wrong program": lambda i: _wrong_program(
        rule_path(i.prefix), i.stored_prefix
    ),
    "config unreadable": lambda i: os.chown(i.config, 5, 0),
    "config mode": lambda i: os.chmod(i.config, 0o666),
}


@pytest.mark.parametrize("which", ["kms", "stored"])
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_pasting_every_fix_gives_back_the_original_install(
    breakage: str, which: str, app_kmskeys: Path
) -> None:
    with both_install() as install:
        prefix = install.prefix if which == "kms" else install.stored_prefix
        args = ("--prefix", prefix, "--config", str(install.config))
        clean, _ = heal(KMSKEYS, args)
        assert clean == [], clean
        original = _state(install)
        BREAKAGES[breakage](install)
        before = doctor(app_kmskeys, *args)
        assert not before["ok"], before
        pasted, after = heal(app_kmskeys, args)
        assert pasted, before
        assert after["ok"], after
        assert all(f["check"] in NO_COMMAND for f in broken(after)), after
        # No fix names the app's environment: the root side's own programs only.
        app_env = str(app_kmskeys.parent.parent)
        assert not any(app_env in fix for fix in pasted), pasted
        assert _state(install) == original, pasted
        # And the install works for both prefixes.
        assert len(install.request("kmst-after-fix")) == 32


def test_the_fix_names_the_recorded_options_and_the_root_sides_programs(
    app_kmskeys: Path,
) -> None:
    with both_install() as install:
        record = parse_record(rule_path(install.prefix).read_text())
        assert record is not None and record.rules == "both"
        rule_path(install.prefix).unlink()
        found = doctor(app_kmskeys, "--prefix", install.prefix, "--config", str(install.config))
        (rule,) = [f for f in broken(found) if f["check"] == "rule"]
        assert shlex.split(rule["fix"]) == [
            record.resolver,
            "install",
            "--config",
            str(install.config),
            "--prefix",
            install.prefix,
            "--rules",
            "both",
        ]
        assert "pip install" not in json.dumps(found)
