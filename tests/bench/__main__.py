"""Run every benchmark row in one process and one sitting; print and record the table.

The machine is shared and noisy, so rows compare against a baseline measured in the same run
and report ratios first. Results go to bench/results.md and the README's results table.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.common import BenchContext, Row, within
from tests.support.admin_group import removed_if_created
from tests.support.imds_guard import GuardUnavailable, HostImdsGuard

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results.md"
README = ROOT / "README.md"
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"

# Row modules, in table order. Each exposes rows(ctx) -> list[Row].
MODULES = ["tests.bench.client", "tests.bench.fresh", "tests.bench.miss", "tests.bench.cgi"]
MODULES.append("tests.bench.dpapi")  # DPAPI and stored: rows (issue 13)
MODULES.append("tests.bench.flood")  # one uid's hostile flood (issue 12)
MODULES.append("tests.bench.doctor")  # `kmskeys doctor` under 1 s (issue 15)
MODULES.append("tests.bench.cli")  # the cached `kmskeys get` (issue 15)
MODULES.append("tests.bench.hostcache")  # host-cache miss and the simulated hour (issue 14)
MODULES.append("tests.bench.identity")  # requester identification added to a miss (issue 24)
MODULES.append("tests.bench.fleet")  # Secrets Manager calls per rotation, simulated (issue 21)
MODULES.append("tests.bench.rotation")  # rotation reaching a running program (issue 21)
MODULES.append("tests.bench.tokens")  # a pass: miss, a token-sealed stored: miss (issue 25)
MODULES.append("tests.bench.refresh")  # refresh-ahead: a reader never meets a miss (issue 26)
MODULES.append("tests.bench.sources")  # Secrets Manager: fresh process and hit (issue 21)


def machine() -> str:
    """One line naming the machine the table was measured on."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} vCPU ({cpu}), "
        f"Python {platform.python_version()}"
    )


def _shown_python(path: str) -> str:
    """Which interpreter the apps ran, relative to the repository when inside it."""
    try:
        return str(Path(path).absolute().relative_to(ROOT))
    except ValueError:
        return "the bench runner's own interpreter" if path == sys.executable else Path(path).name


def render(rows: list[Row], took: float) -> str:
    """The markdown table with its header lines."""
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    lines = [
        f"Measured {today} on {machine()}; `make bench` took {took:.0f} s.",
        "",
        "| row | kmskeys | baseline | ratio | budget | within |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['row']} | {r['value']} | {r['baseline']} | **{r['ratio']}** | {r['budget']} | "
        f"{within(r)} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    """Replace the table between the bench markers in README.md."""
    if not README.exists():
        return
    text = README.read_text()
    pattern = re.compile(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), re.S)
    if pattern.search(text):
        README.write_text(pattern.sub(f"{MARK_START}\n{table}{MARK_END}", text))


def _guard() -> HostImdsGuard | None:
    """The IMDS guard of the suite (tests/support/imds_guard.py), around the whole run."""
    try:
        return HostImdsGuard().install()
    except GuardUnavailable as exc:
        print(f"bench: imds guard off (missing: {exc})", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    """Run the rows of the named modules (default: all) and write the results."""
    names = (argv if argv is not None else sys.argv[1:]) or MODULES
    guard = _guard()
    try:
        return _run(names, guard)
    finally:
        if guard is not None:
            guard.remove()


def _run(names: list[str], guard: HostImdsGuard | None) -> int:
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kmst-bench-") as tmp, removed_if_created():
        # make bench points this at a regular (non-editable) install, as in production.
        # Absolute but not resolved: a venv is recognised by the path of its own python link.
        app_python = os.path.abspath(os.environ.get("KMSKEYS_BENCH_PYTHON") or sys.executable)
        ctx = BenchContext(tmp=Path(tmp), python=app_python)
        ctx.notes.append(f"apps (CGI scripts, fresh processes) run {_shown_python(app_python)}")
        # Apps start in a scratch directory: from the repository root, `python -c` would import
        # the source tree ahead of the installed package.
        here = os.getcwd()
        os.chdir(tmp)
        try:
            for name in names:
                print(f"bench: {name} ...", file=sys.stderr, flush=True)
                rows += importlib.import_module(name).rows(ctx)
        finally:
            os.chdir(here)
        notes = list(ctx.notes)
    sent = guard.imds_packets() if guard is not None else 0
    if sent:
        print(
            f"bench: {sent} packet(s) to the instance-metadata address on the host's network "
            "(refused by the guard): a row probes IMDS outside a network namespace of its own",
            file=sys.stderr,
        )
        return 1
    table = render(rows, time.monotonic() - started)
    if notes:
        table += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    print(table)
    if names == MODULES:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text("# kmskeys benchmark results\n\n" + table)
        update_readme(table)
    over = [r["row"] for r in rows if r["ok"] is False]
    if over:
        # A measurement, not a gate: say plainly which budgets are missed.
        print("over budget: " + "; ".join(over), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
