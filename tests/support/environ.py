"""The environment as a dict, safe to take in one thread while another changes it."""

from __future__ import annotations

import os


def snapshot() -> dict[str, str]:
    """os.environ, copied key by key. Background jobs (the terraform tier's, the packaging
    tier's builds) read it while a test's monkeypatch may add or remove a variable, and a
    comprehension over `os.environ.items()` then raises KeyError for a key gone meanwhile."""
    out: dict[str, str] = {}
    for key in list(os.environ):
        value = os.environ.get(key)
        if value is not None:
            out[key] = value
    return out
