"""Which modules a command imports: the check behind the `kmskeys get` start-up budget."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

# What a cached `kmskeys get` must not import: each costs milliseconds of a 3 ms budget.
SLOW_IMPORTS = frozenset({"argparse", "re", "pathlib", "enum", "typing"})


def imported_modules(argv: Sequence[str], env: dict[str, str] | None = None) -> set[str]:
    """The modules a run of argv imports, from `-X importtime` (PYTHONPROFILEIMPORTTIME)."""
    done = subprocess.run(
        list(argv),
        env={**(os.environ if env is None else env), "PYTHONPROFILEIMPORTTIME": "1"},
        capture_output=True,
        check=True,
        timeout=30,
    )
    lines = done.stderr.decode().splitlines()
    return {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
