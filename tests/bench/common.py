"""What every benchmark row module shares: the context, the row shape, small statistics."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

BARE_RUNS = 40
# systemd-creds creates its host key here when it is missing; a row that made it removes it.
CREDENTIAL_SECRET = Path("/var/lib/systemd/credential.secret")


@contextmanager
def host_credential(tmp: Path, payload: bytes) -> Iterator[list[str]]:
    """`payload` encrypted by systemd-creds with the host key: the argv that decrypts it to
    stdout. Removes the credential, and the host key if this made it, afterwards."""
    plain, credential = tmp / "systemd-cred.in", tmp / "systemd-cred"
    created_secret = not CREDENTIAL_SECRET.exists()
    try:
        plain.write_bytes(payload)
        subprocess.run(
            ["systemd-creds", "encrypt", "--with-key=host", "--name=kmst", str(plain),
             str(credential)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        plain.unlink()
        yield ["systemd-creds", "decrypt", "--name=kmst", str(credential), "-"]
    finally:
        plain.unlink(missing_ok=True)
        credential.unlink(missing_ok=True)
        if created_secret:
            CREDENTIAL_SECRET.unlink(missing_ok=True)


def print_rows(rows: list[Row]) -> int:
    """Print rows one per line (a module run alone, without writing results.md)."""
    for item in rows:
        print(" | ".join(str(v) for v in item.values()))
    return 0


class Row(TypedDict):
    """One line of the results table; `ok` is None for a row with no budget ("n/a")."""

    row: str
    value: str
    baseline: str
    ratio: str
    budget: str
    ok: bool | None


def within(row: Row) -> str:
    """The table's "within" cell: yes, no, or n/a for a row without a budget."""
    return {True: "yes", False: "**no**", None: "n/a"}[row["ok"]]


@dataclass
class BareBaseline:
    """`python -c pass` measured once per run and shared by every fresh-process row."""

    samples: list[float]  # seconds

    @property
    def median_ms(self) -> float:
        return median(self.samples) * 1000

    def describe(self) -> str:
        low, high = percentile(self.samples, 10) * 1000, percentile(self.samples, 90) * 1000
        return (
            f"python -c pass {self.median_ms:.1f} ms "
            f"(p10-p90 {low:.1f}-{high:.1f} ms, {len(self.samples)} runs)"
        )


@dataclass
class BenchContext:
    """Shared by the row modules of one run."""

    tmp: Path
    python: str = sys.executable
    notes: list[str] = field(default_factory=list)
    _bare: BareBaseline | None = None

    @property
    def resolver(self) -> Path:
        """The kmskeys-resolver of the apps' install (the regular one under make bench)."""
        return Path(self.python).parent / "kmskeys-resolver"

    def env(self) -> dict[str, str]:
        """The small environment every fresh process of the bench gets."""
        return {"PATH": os.environ.get("PATH", "")}

    def bare(self) -> BareBaseline:
        """The run's one `python -c pass` baseline, measured on first use."""
        if self._bare is None:
            argv = [self.python, "-c", "pass"]
            time_process(argv, env=self.env())  # page cache
            self._bare = BareBaseline(
                [time_process(argv, env=self.env()) for _ in range(BARE_RUNS)]
            )
            self.notes.append(
                f"shared baseline for the fresh-process rows: {self._bare.describe()}"
            )
        return self._bare


def row(name: str, *, value: str, baseline: str, ratio: str, budget: str, ok: bool | None) -> Row:
    """Build a table row (ok=None: the row has no budget)."""
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
