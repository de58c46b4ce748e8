"""Write a rule into /etc/request-key.d for one test, and remove it afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.names import unique_prefix
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
