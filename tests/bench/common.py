"""What every benchmark row module shares: the context, the row shape, small statistics."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict


class Row(TypedDict):
    """One line of the results table."""

    row: str
    value: str
    baseline: str
    ratio: str
    budget: str
    ok: bool


@dataclass
class BenchContext:
    """Shared by the row modules of one run."""

    tmp: Path
    python: str = sys.executable
    notes: list[str] = field(default_factory=list)


def row(name: str, *, value: str, baseline: str, ratio: str, budget: str, ok: bool) -> Row:
    """Build a table row."""
    return Row(row=name, value=value, baseline=baseline, ratio=ratio, budget=budget, ok=ok)


def percentile(samples: Sequence[float], pct: float) -> float:
    """The pct-th percentile (nearest rank) of samples."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(samples: Sequence[float]) -> float:
    """The median of samples."""
    return statistics.median(samples)


def time_process(argv: Sequence[str], **kwargs: object) -> float:
    """Wall-clock seconds for one run of argv to exit successfully."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - start
