"""Every `make bench` row module imports and has rows(): a renamed helper must fail here, in
`make test`, not only when someone next runs the benchmark."""

from __future__ import annotations

import importlib

import pytest

from tests.bench.__main__ import MODULES

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("module", MODULES)
def test_bench_module_imports_and_has_rows(module: str) -> None:
    assert callable(importlib.import_module(module).rows)
