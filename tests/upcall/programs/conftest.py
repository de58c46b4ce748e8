"""The program-binding tests' install (its policy binds names to app.service) and cgroups."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import cgroups
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.upcall.harness import Install, fresh, installed
from tests.upcall.programs.bound import POLICY


@pytest.fixture(scope="module")
def bound(kms_backend: tuple[KmsEmulator, KmsProxy, str]) -> Iterator[Install]:
    """A resolver install whose policy binds `kmst-*-pbapp-*` names to app.service."""
    emulator, proxy, key_arn = kms_backend
    with installed(emulator, proxy, key_arn, names=POLICY) as install:
        yield install


@pytest.fixture
def install(bound: Install, session_keyring: object) -> Iterator[Install]:
    """The bound install, with counts, faults and log lines reset."""
    with fresh(bound):
        yield bound


@pytest.fixture
def cg() -> Iterator[cgroups.Slice]:
    """A unique slice with app.service and other.service; fails (never skips) if impossible."""
    lacking = cgroups.missing()
    if lacking:
        pytest.fail("cgroup v2 tests cannot run here; missing: " + "; ".join(lacking))
    with cgroups.slice_with("app.service", "other.service") as made:
        yield made
