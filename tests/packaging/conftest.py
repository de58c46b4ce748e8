"""What `make dist` builds, once for the packaging tests, in background (dist.py)."""

from __future__ import annotations

import pytest

from tests.packaging.dist import Dist, background


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the builds the collected tests need, while the tiers before this one run."""
    if not session.config.option.collectonly:
        background.start(session.items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    background.stop()


@pytest.fixture(scope="session")
def dist() -> Dist:
    """The sdist, the wheel and the Debian package, as `make dist` builds them."""
    result: Dist = background.result("dist")
    return result
