"""The import contracts of `make lint` hold, and each one really fails on a violation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("kmskeys", "encryptor", "resolver")

# contract id -> files that break it, added to a copy of the tree.
VIOLATIONS = {
    "client-stands-alone": {"kmskeys/_violation.py": "import botocore\n"},
    "build-and-host-apart": {"encryptor/_violation.py": "from resolver import config\n"},
    "no-cycles": {
        "resolver/_cycle_a.py": "from resolver import _cycle_b\n",
        "resolver/_cycle_b.py": "def f() -> None:\n    from resolver import _cycle_a\n",
    },
    # A hot-path module that reaches the toolbox through a module of its own: the contract
    # follows indirect imports, and a lazy import inside a function counts.
    "hot-path-apart": {
        "kmskeys/_violation.py": "def f() -> None:\n    from kmskeys.doctor import rule\n",
    },
}
# contract id -> lines appended to existing modules of the copy (restored afterwards).
APPENDED = {
    "hot-path-apart": {
        "kmskeys/names.py": "\n\ndef _violate() -> None:\n    import kmskeys._violation\n"
    },
}


def _lint(tree: Path, contract: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache", "--contract", contract],
        cwd=tree,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the three packages' sources and the contracts."""
    root = tmp_path_factory.mktemp("contracts")
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize("contract", sorted(VIOLATIONS))
def test_contract_holds_and_breaks_on_a_violation(tree: Path, contract: str) -> None:
    kept = _lint(tree, contract)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    added = [tree / path for path in VIOLATIONS[contract]]
    appended = {tree / path: text for path, text in APPENDED.get(contract, {}).items()}
    originals = {path: path.read_text() for path in appended}
    try:
        for path, text in zip(added, VIOLATIONS[contract].values(), strict=True):
            path.write_text(text)
        for path, text in appended.items():
            path.write_text(originals[path] + text)
        broken = _lint(tree, contract)
    finally:
        for path in added:
            path.unlink()
        for path, text in originals.items():
            path.write_text(text)
    assert broken.returncode != 0, broken.stdout
    assert "BROKEN" in broken.stdout, broken.stdout
    assert "_violation" in broken.stdout or "_cycle_" in broken.stdout, broken.stdout
