"""Soak-tier reporting: the figures are printed at the end of the run, whatever `-s` says.

`make soak` (KMSKEYS_SOAK=long) also writes them to tests/soak/results.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

FIGURES: list[tuple[str, dict[str, Any]]] = []
RESULTS = Path(__file__).with_name("results.md")


def record(title: str, figures: dict[str, Any]) -> None:
    """Keep one run's figures for the terminal summary (and results.md on long runs)."""
    FIGURES.append((title, figures))
    if os.environ.get("KMSKEYS_SOAK") == "long":
        lines = [f"# Soak figures: {title}", "", "| figure | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in figures.items()]
        RESULTS.write_text("\n".join(lines) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the soak figures after the test summary."""
    for title, figures in FIGURES:
        terminalreporter.section(f"soak figures: {title}")
        for key, value in figures.items():
            terminalreporter.write_line(f"{key:>36}: {value}")


@pytest.fixture
def soak_size() -> str:
    """`long` under `make soak`, else `short` (the version `make test` runs)."""
    return "long" if os.environ.get("KMSKEYS_SOAK") == "long" else "short"
