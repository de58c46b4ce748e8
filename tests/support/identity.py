"""The identification rule for a test: tests/support/identify_handler.py behind a real upcall.

`IdentityRule` writes `create user PREFIX:* * PYTHON identify_handler.py %k %u DIR` under a
unique prefix, with DIR a root-only report directory, and reads back what the handler saw
(`verdict`), holds it before identifying (`held`, `release`) and gives it a policy.
`request(description)` is what a requester runs: request_key in its own session keyring, and
the identity the handler instantiated the key with.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.request_key_rule import request_key_rule

HANDLER = Path(__file__).resolve().parent / "identify_handler.py"
WAIT = 15.0


class IdentityRule:
    """The installed rule (`prefix`) and its report directory."""

    def __init__(self, prefix: str, directory: Path) -> None:
        self.prefix = prefix
        self.directory = directory

    def description(self, name: str) -> str:
        """The key description that reaches the handler with `name`."""
        return f"{self.prefix}:{name}"

    def policy(self, **keys: list[str]) -> None:
        """The handler checks these program-policy keys (allow_units=[...], ...) from now on."""
        # Whole or not at all, as the handler publishes its files: a handler still running
        # from an earlier request may read it at any moment.
        draft = self.directory / "policy.draft"
        draft.write_text(json.dumps(keys))
        os.replace(draft, self.directory / "policy.json")

    def _wait(self, path: Path, timeout: float = WAIT) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while not path.exists():
            crash = self.directory / "crash.txt"
            if crash.exists():
                raise RuntimeError(f"the handler crashed:\n{crash.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the handler wrote no {path.name} within {timeout} s")
            time.sleep(0.01)
        # The handler publishes each file whole (identify_handler.py `_publish`: a draft
        # renamed into place), so the first read that finds it finds all of it.
        found: dict[str, object] = json.loads(path.read_text())
        return found

    def held(self, name: str) -> dict[str, int]:
        """Wait until the handler holds request `name`: {"auth": serial, "target": serial}."""
        return {k: int(str(v)) for k, v in self._wait(self.directory / f"held-{name}.json").items()}

    def release(self, name: str) -> None:
        """Let the held handler of `name` go on and identify."""
        (self.directory / f"release-{name}").touch()

    def verdict(self, name: str) -> dict[str, object]:
        """What the handler decided for `name`: {"ok", "identity" or "error"/"reason"/"errno",
        "answered"}."""
        return self._wait(self.directory / f"verdict-{name}.json")


@contextmanager
def identity_rule(tmp: Path, python: str = sys.executable) -> Iterator[IdentityRule]:
    """Install the identification rule for one test; removed afterwards."""
    directory = tmp / "identity-reports"
    directory.mkdir(mode=0o700)
    # request-key does not pass the program's path as argv[0], so a venv's python started
    # directly would not find its venv: a script whose #! names it does (the kernel passes
    # the interpreter's path), as the installed kmskeys-resolver is.
    launcher = directory / "identify-handler"
    launcher.write_text(
        f"#!{python}\nimport runpy, sys\nsys.argv[0] = {str(HANDLER)!r}\n"
        f"runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    launcher.chmod(0o700)
    with request_key_rule(f"{launcher} %k %u {directory}") as prefix:
        yield IdentityRule(prefix, directory)


def request(description: str) -> dict[str, object]:
    """In a requester: request the key (upcalling), read it, return the identity it holds."""
    from kmskeys import keyutils

    serial = keyutils.request_key(
        b"user", description.encode(), b"", keyutils.KEY_SPEC_SESSION_KEYRING
    )
    seen: dict[str, object] = json.loads(keyutils.keyctl_read(serial))
    return seen
