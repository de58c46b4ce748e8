"""Suite-wide fixtures: tier prerequisites (fail, never skip) and a fresh session keyring."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.prereqs import CHECKS, missing_for

_missing_cache: dict[str, list[str]] = {}


@pytest.fixture(autouse=True)
def _tier_prerequisites(request: pytest.FixtureRequest) -> None:
    """Fail (not skip) a test whose tier this machine cannot run, saying what is missing."""
    for tier in CHECKS:
        if request.node.get_closest_marker(tier) is None:
            continue
        if tier not in _missing_cache:
            _missing_cache[tier] = missing_for(tier)
        if _missing_cache[tier]:
            pytest.fail(
                f"tier '{tier}' cannot run here; missing: " + "; ".join(_missing_cache[tier]),
                pytrace=False,
            )


@pytest.fixture
def session_keyring() -> Iterator[object]:
    """Run the test inside its own new anonymous session keyring, emptied afterwards."""
    from kmskeys import Keyring

    ring = Keyring.join_session()
    try:
        yield ring
    finally:
        # A test that joined another session has already dropped this keyring (the kernel frees
        # it with its keys); otherwise empty it, then leave it for a new empty one.
        if Keyring.session() == ring:
            ring.clear()
        Keyring.join_session()
