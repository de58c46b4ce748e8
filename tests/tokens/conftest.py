"""Tokens-tier fixtures: a test user with a real GnuPG key, gpg-agent and `pass` store, and a
SoftHSM2 token initialised by the test. Each is made once per session and removed after."""

from __future__ import annotations

import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.passgpg import PassOwner, pass_owner, pass_user, scratch


@pytest.fixture(scope="session")
def pass_base() -> Iterator[Path]:
    """A scratch directory other users may traverse."""
    with scratch() as base:
        yield base


@pytest.fixture(scope="session")
def pass_session_user(pass_base: Path) -> Iterator[PassOwner]:
    """The test user, its key, agent and populated store (see tests/support/passgpg.py)."""
    with pass_user(pass_base) as owner:
        yield owner


@pytest.fixture
def passer(pass_session_user: PassOwner) -> Iterator[PassOwner]:
    """The test user with its agent running and unlocked, restored after the test."""
    pass_session_user.start_agent_if_stopped()
    pass_session_user.unlock()
    yield pass_session_user
    pass_session_user.start_agent_if_stopped()


@pytest.fixture(scope="session")
def pass_root(pass_base: Path) -> Iterator[PassOwner]:
    """Root's key, agent and store below the scratch directory (root's home is never touched)."""
    with pass_owner(pass_base / "root", pwd.getpwuid(0)) as owner:
        yield owner
