"""`kmskeys get` row: a cached secret printed by the installed command, in a new process.

The budget (docs/design.md) is the bare interpreter start plus 3 ms: the command's own imports,
argument parsing and the kernel read. `keyctl pipe` (a C program reading the same key) and
`systemd-creds decrypt` (a host-key credential, the closest thing systemd has) are shown beside
it for scale. Runs are interleaved so that the machine's noise hits all of them alike.
"""

from __future__ import annotations

import subprocess
from contextlib import ExitStack
from pathlib import Path

from kmskeys import Keyring
from tests.bench.common import BenchContext, Row, host_credential, median, row, time_process
from tests.support.names import unique

RUNS = 40
BUDGET_MS = 3.0
SECRET = b"s3cret-value-for-the-cli-row"


def rows(ctx: BenchContext) -> list[Row]:
    """The cached `kmskeys get` of the apps' install, against its baseline and its peers."""
    kmskeys_cli = str(Path(ctx.python).parent / "kmskeys")
    ring = Keyring.join_session()  # every process timed below inherits it
    stack = ExitStack()
    try:
        prefix, name = "kmstbench", unique("cli")
        key = ring.add_key("user", f"{prefix}:{name}", SECRET)
        get = [kmskeys_cli, "get", name, "--prefix", prefix]
        keyctl = ["keyctl", "pipe", str(key.serial)]
        creds = stack.enter_context(host_credential(ctx.tmp, SECRET))
        for argv in (get, keyctl, creds):
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
        bare, ours, lib, pipe, systemd = [], [], [], [], []
        for _ in range(RUNS):
            bare.append(time_process(bare_argv, env=env))
            ours.append(time_process(get, env=env))
            lib.append(time_process(library, env=env))
            pipe.append(time_process(keyctl, env=env))
            systemd.append(time_process(creds, env=env, stderr=subprocess.DEVNULL))
    finally:
        stack.close()
        ring.clear()
        Keyring.join_session()
    o, b = median(ours) * 1000, median(bare) * 1000
    k, s, li = median(pipe) * 1000, median(systemd) * 1000, median(lib) * 1000
    delta = o - b
    return [
        row(
            "`kmskeys get NAME` of a cached secret (installed command, new process)",
            value=f"{o:.1f} ms",
            baseline=f"python -c pass {b:.1f} ms (get_secret in python -c: {li:.1f} ms); "
            f"keyctl pipe {k:.1f} ms; systemd-creds decrypt --with-key=host {s:.1f} ms",
            ratio=f"+{delta:.1f} ms",
            budget=f"≤ +{BUDGET_MS:.0f} ms",
            ok=delta <= BUDGET_MS,
        )
    ]
