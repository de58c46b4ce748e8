"""Unique names, so tests never collide with a real installation or with each other."""

from __future__ import annotations

import os
import secrets

# Every key description, request-key.d file, netns and config the suite creates starts with this.
TEST_TAG = "kmst"

# Every name and prefix this process handed out: what the session's leftover check looks for
# (tests/support/leftover_keys.py), so that another session's keys on this kernel never count.
_issued: set[str] = set()


def issued() -> frozenset[str]:
    """The names and prefixes `unique` and `unique_prefix` gave out in this process."""
    return frozenset(_issued)


def unique(stem: str = "t") -> str:
    """A short unique token such as `kmst-1234-a1b2c3`."""
    name = f"{TEST_TAG}-{os.getpid()}-{stem}-{secrets.token_hex(3)}"
    _issued.add(name)
    return name


def unique_prefix() -> str:
    """A unique description prefix for a test resolver install (matches [a-z][a-z0-9_-]*)."""
    prefix = f"{TEST_TAG}{secrets.token_hex(4)}"
    _issued.add(prefix)
    return prefix
