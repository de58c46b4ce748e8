"""What scripts/generate.py writes is current, and every compiled part is of this build."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kmskeys import contract
from resolver import config_text, limits
from resolver.config import COMPONENTS, parse_text
from resolver.install import gate_executable
from resolver.settings import declared, toml_keys

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate", REPO / "scripts" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_header_the_stamp_and_the_docs_table_are_current() -> None:
    stale = [str(p.relative_to(REPO)) for p in _generator().stale()]
    assert stale == [], f"run make generate (then make venv): {stale}"


def test_the_docs_table_is_the_settings_tables() -> None:
    docs = (REPO / "docs" / "resolver.md").read_text()
    start, end = docs.index(config_text.DOCS_START), docs.index(config_text.DOCS_END)
    assert docs[start : end + len(config_text.DOCS_END)] == config_text.docs_table()
    # And the table names every key of every component, with its default.
    for component in COMPONENTS:
        for f, meta in declared(component.settings):
            for key in toml_keys(f, meta):
                row = f'`[{key}."GLOB"]`' if meta.rule_keys else f"`{key}`"
                assert row in docs[start:end], key


def test_the_template_is_the_defaults_and_sets_only_what_it_is_given() -> None:
    text = config_text.template()
    config = parse_text(text.encode())
    assert config.ttl == 300 and config.key_arns == () and config.blob_dir.is_absolute()
    given = config_text.template(
        {"ttl": 60, "key_arns": ["arn:aws:kms:eu-west-1:111122223333:key/k"]}
    )
    assert parse_text(given.encode()).ttl == 60
    assert re.search(r"^ttl = 60$", given, re.M) and "# ttl = 300" not in given


def test_a_drifted_docs_table_is_found_stale(tmp_path: Path) -> None:
    generator = _generator()
    docs = tmp_path / "resolver.md"
    docs.write_text(
        (REPO / "docs" / "resolver.md").read_text().replace("| `ttl` | `300`", "| `ttl` | `30`")
    )
    generator.DOCS = docs
    assert docs in generator.stale()


def test_every_compiled_part_carries_this_build_stamp() -> None:
    from kmskeys._keyutils_cffi import ffi, lib

    from kmskeys import _hitpath

    assert contract.BUILD_STAMP.startswith("0.1.0+")
    assert _hitpath.BUILD_STAMP == contract.BUILD_STAMP
    assert ffi.string(lib.kmsk_build_stamp()).decode() == contract.BUILD_STAMP
    done = subprocess.run(
        [str(gate_executable()), "--stamp"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == contract.BUILD_STAMP


def test_a_stale_build_does_not_import(tmp_path: Path) -> None:
    # `import kmskeys` checks the hit-path extension, with Python expecting another build than
    # the one compiled: a copy of the package whose stamp line says so.
    import kmskeys

    package = Path(kmskeys.__file__).parent
    copy = tmp_path / "kmskeys"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "__init__.py"
    init.write_text(init.read_text().replace(f'"{kmskeys.BUILD_STAMP}"', '"0.0.0+stale"', 1))
    code = "import kmskeys\nprint(kmskeys.__file__)\n"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0, done.stdout
    assert "kmskeys._hitpath was built from other sources" in done.stderr
    assert "'0.0.0+stale'" in done.stderr and "reinstall kmskeys" in done.stderr
    assert str(copy) in done.stderr, done.stderr  # the copy, not the installed package


def test_a_gate_of_another_build_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(limits.GATE_STAMP_ENV, "0.0.0+other")
    found = limits.stale_gate()
    assert found is not None and "kmskeys-gate was built from other sources" in found
    monkeypatch.setenv(limits.GATE_STAMP_ENV, contract.BUILD_STAMP)
    assert limits.stale_gate() is None
    # A gate from before stamps passes its slot without one; no gate at all passes neither.
    monkeypatch.setenv(limits.SLOT_FD_ENV, "9")
    assert limits.stale_gate() is not None
    monkeypatch.delenv(limits.SLOT_FD_ENV)
    assert limits.stale_gate() is None


def test_every_shipped_backend_declares_its_table_prefix_and_policy() -> None:
    from resolver.config import Config
    from resolver.registry import SHIPPED

    tables = {component.settings for component in COMPONENTS}
    for spec, _load in SHIPPED:
        assert issubclass(Config, spec.settings) and spec.settings in tables, spec.name
        names = {f.name for f, _meta in declared(spec.settings)}
        assert {spec.prefix_setting, spec.policy_setting} <= names, spec.name
