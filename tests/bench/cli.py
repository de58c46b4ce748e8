"""`kmskeys get` rows: a cached secret printed by the installed command, in a new process.

The command is a small C program (bin/kmskeys.c) for a cached `get`. Its budget (docs/design.md)
is at most 2x `keyctl pipe` (a C program reading the same key by serial) and below
`systemd-creds decrypt` (a host-key credential, the closest thing systemd has), all three in the
same run. The Python CLI that runs every other command (`kmskeys-py`) is timed beside them and
reported against a bare interpreter start (it was the command's budget: plus 3 ms). Runs are
interleaved so that the machine's noise hits all of them alike.
"""

from __future__ import annotations

import subprocess
from contextlib import ExitStack
from pathlib import Path

from kmskeys import Keyring
from tests.bench.common import BenchContext, Row, host_credential, median, row, time_process
from tests.support.names import unique

RUNS = 40
BUDGET_X_KEYCTL = 2.0
PYTHON_WAS_MS = 3.0
SECRET = b"s3cret-value-for-the-cli-row"


def rows(ctx: BenchContext) -> list[Row]:
    """The cached `kmskeys get` of the apps' install, against its baselines and its peers."""
    bindir = Path(ctx.python).parent
    ring = Keyring.join_session()  # every process timed below inherits it
    stack = ExitStack()
    try:
        prefix, name = "kmstbench", unique("cli")
        key = ring.add_key("user", f"{prefix}:{name}", SECRET)
        get = [str(bindir / "kmskeys"), "get", name, "--prefix", prefix]
        python_get = [str(bindir / "kmskeys-py"), *get[1:]]
        keyctl = ["keyctl", "pipe", str(key.serial)]
        creds = stack.enter_context(host_credential(ctx.tmp, SECRET))
        for argv in (get, python_get, keyctl, creds):
            done = subprocess.run(argv, capture_output=True, check=True, timeout=30)
            assert done.stdout == SECRET, argv[0]
        bare_argv = [ctx.python, "-c", "pass"]
        # The same read without the command: what the client import alone adds to a bare start.
        library = [
            ctx.python,
            "-c",
            f"import kmskeys; kmskeys.get_secret({name!r}, prefix={prefix!r})",
        ]
        env = ctx.env()
        timed: dict[str, list[float]] = {k: [] for k in ("get", "py", "bare", "lib", "k", "s")}
        for _ in range(RUNS):
            timed["get"].append(time_process(get, env=env))
            timed["k"].append(time_process(keyctl, env=env))
            timed["s"].append(time_process(creds, env=env, stderr=subprocess.DEVNULL))
            timed["bare"].append(time_process(bare_argv, env=env))
            timed["py"].append(time_process(python_get, env=env))
            timed["lib"].append(time_process(library, env=env))
    finally:
        stack.close()
        ring.clear()
        Keyring.join_session()
    ms = {label: median(samples) * 1000 for label, samples in timed.items()}
    o, k, s = ms["get"], ms["k"], ms["s"]
    return [
        row(
            "`kmskeys get NAME` of a cached secret (installed command, new process)",
            value=f"{o:.2f} ms",
            baseline=f"keyctl pipe {k:.2f} ms; systemd-creds decrypt --with-key=host {s:.1f} ms",
            ratio=f"{o / k:.2f}x keyctl pipe, {o / s:.2f}x systemd-creds",
            budget=f"≤ {BUDGET_X_KEYCTL:.0f}x keyctl pipe, < systemd-creds",
            ok=o <= BUDGET_X_KEYCTL * k and o < s,
        ),
        row(
            "`kmskeys-py get NAME`, the Python CLI (every other command and outcome runs it)",
            value=f"{ms['py']:.1f} ms",
            baseline=f"python -c pass {ms['bare']:.1f} ms "
            f"(get_secret in python -c: {ms['lib']:.1f} ms)",
            ratio=f"+{ms['py'] - ms['bare']:.1f} ms",
            # The command's budget was this (docs/design.md): reported since the C program
            # answers a cached get; tests/kernel/test_cli.py keeps its imports lean.
            budget=f"reported (was ≤ +{PYTHON_WAS_MS:.0f} ms)",
            ok=True,
        ),
    ]
