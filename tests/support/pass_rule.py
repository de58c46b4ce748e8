"""The pass rule for a test: tests/support/pass_handler.py behind a real upcall.

`pass_rule(tmp)` writes `create user PREFIX:* * LAUNCHER %k %u DIR` under a unique prefix, with
DIR a root-only directory holding the handler's config (per-uid store and GnuPG home templates,
as root's config would) and its verdicts.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.request_key_rule import request_key_rule

HANDLER = Path(__file__).resolve().parent / "pass_handler.py"
WAIT = 30.0


class PassRule:
    """The installed rule (`prefix`) and its directory."""

    def __init__(self, prefix: str, directory: Path) -> None:
        self.prefix = prefix
        self.directory = directory

    def description(self, rest: str) -> str:
        """The key description for `NAME[#selector]`."""
        return f"{self.prefix}:{rest}"

    def configure(self, users: dict[int, dict[str, str]]) -> None:
        """Per-uid templates: {uid: {"store": ..., "gnupg": ...}}."""
        (self.directory / "config.json").write_text(json.dumps({"users": users}))

    def verdicts(self) -> list[dict[str, object]]:
        """Every verdict written so far, oldest first."""
        crash = self.directory / "crash.txt"
        if crash.exists():
            raise RuntimeError(f"the handler crashed:\n{crash.read_text()}")
        files = sorted(self.directory.glob("verdict-*.json"), key=lambda p: p.stat().st_mtime_ns)
        return [json.loads(p.read_text()) for p in files]

    def last_verdict(self, count_before: int) -> dict[str, object]:
        """Wait for the verdict after `count_before` others."""
        deadline = time.monotonic() + WAIT
        while len(found := self.verdicts()) <= count_before:
            if time.monotonic() > deadline:
                raise TimeoutError("the pass handler wrote no verdict")
            time.sleep(0.01)
        return found[-1]


@contextmanager
def pass_rule(tmp: Path, python: str = sys.executable) -> Iterator[PassRule]:
    """Install the pass rule for one test; removed afterwards."""
    directory = tmp / "pass-rule"
    directory.mkdir(mode=0o700)
    (directory / "config.json").write_text('{"users": {}}')
    # A script whose #! names the venv's python (request-key passes no argv[0] path).
    launcher = directory / "pass-handler"
    launcher.write_text(
        f"#!{python}\nimport runpy, sys\nsys.argv[0] = {str(HANDLER)!r}\n"
        f"runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    launcher.chmod(0o700)
    with request_key_rule(f"{launcher} %k %u {directory}") as prefix:
        yield PassRule(prefix, directory)
