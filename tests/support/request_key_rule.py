"""Write a rule into /etc/request-key.d for one test, and remove it afterwards."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.names import unique, unique_prefix
from tests.support.prereqs import REQUEST_KEY_D


@contextmanager
def request_key_rule(program: str) -> Iterator[str]:
    """Install `create user PREFIX:* * PROGRAM` under a unique prefix; yield the prefix."""
    prefix = unique_prefix()
    path = REQUEST_KEY_D / f"{prefix}.conf"
    path.write_text(f"create user {prefix}:* * {program}\n")
    try:
        yield prefix
    finally:
        Path(path).unlink(missing_ok=True)


def recorded_request(workdir: Path, argv_prefix: list[str]) -> tuple[bool, bool]:
    """(request-key ran, the key came back) for `keyctl request2` run under argv_prefix.

    An independent check of the upcall probe: keyctl(1) in a new session keyring, against a
    rule whose program records its invocation before instantiating the key.
    """
    calls = workdir / "calls"
    script = workdir / "record.sh"
    script.write_text(f'#!/bin/sh\necho "$2" >> {calls}\nexec keyctl instantiate "$1" x "$3"\n')
    script.chmod(0o755)
    with request_key_rule(f"{script} %k %u %S") as prefix:
        request = ["keyctl", "request2", "user", f"{prefix}:{unique()}", "callout"]
        done = subprocess.run(
            [*argv_prefix, "keyctl", "session", "-", *request],
            capture_output=True,
            timeout=30,
            check=False,
        )
    return calls.exists(), done.returncode == 0
