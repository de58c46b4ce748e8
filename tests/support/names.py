"""Unique names, so tests never collide with a real installation or with each other."""

from __future__ import annotations

import os
import secrets

# Every key description, request-key.d file, netns and config the suite creates starts with this.
TEST_TAG = "kmst"


def unique(stem: str = "t") -> str:
    """A short unique token such as `kmst-1234-a1b2c3`."""
    return f"{TEST_TAG}-{os.getpid()}-{stem}-{secrets.token_hex(3)}"


def unique_prefix() -> str:
    """A unique description prefix for a test resolver install (matches [a-z][a-z0-9_-]*)."""
    return f"{TEST_TAG}{secrets.token_hex(4)}"
