"""Fault-tier fixtures: a resolver install with a short deadline behind the fault proxy.

`faulty` is one install for the whole tier (deadline 2.5 s; negative_ttl 3 s, the shortest a test
may rely on, tests/support/ttl.py) so that every fault resolves in seconds; each test gets it
with the fault cleared, counts and log reset, in a fresh session keyring.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.ttl import MIN_TTL
from tests.upcall.harness import Install, fresh, installed, kms_stack

DEADLINE = 2.5
NEGATIVE_TTL = MIN_TTL
# This tier counts KMS calls and retries under faults: the per-uid KMS call rate (its own tests
# are in tests/security) must not be what runs out. Every install of the tier starts from these.
FAULT_SETTINGS: dict[str, object] = {
    "deadline": DEADLINE,
    "negative_ttl": NEGATIVE_TTL,
    "kms_rate_per_uid": 1000,
    "kms_burst_per_uid": 100000,
}


@pytest.fixture(scope="session")
def fault_backend() -> Iterator[tuple[KmsEmulator, KmsProxy, str]]:
    """The tier's moto server, fault proxy and KMS key."""
    with kms_stack() as stack:
        yield stack


@pytest.fixture(scope="session")
def fault_install(fault_backend: tuple[KmsEmulator, KmsProxy, str]) -> Iterator[Install]:
    """One resolver install with a short deadline and negative_ttl, behind the proxy."""
    emulator, proxy, key_arn = fault_backend
    with installed(emulator, proxy, key_arn, **FAULT_SETTINGS) as install:
        yield install


@pytest.fixture
def faulty(fault_install: Install, session_keyring: object) -> Iterator[Install]:
    """The tier's install with no fault, counts and log reset, in a fresh session keyring."""
    with fresh(fault_install):
        yield fault_install
