"""Upcall-tier fixtures: a moto server behind a counting proxy, and a real resolver install.

`resolver_install` (session) installs kmskeys-resolver under a unique prefix with a root-owned
config, credentials file, blob_dir and its own syslog socket; `resolver` hands a test that
install with counts, faults and log lines reset. `extra_install` makes a second installation
with other settings (legacy blobs, short deadlines) for one test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.upcall.daemonpath import DAEMON_WAIT
from tests.upcall.harness import (
    KMSKEYS,
    NOBODY_ONLY_GLOB,
    RESOLVER,
    SHORT_TTL,
    SHORT_TTL_GLOB,
    Install,
    fresh,
    installed,
    kms_stack,
    run_resolver,
)
from tests.upcall.sources import Sources, sources_installed

__all__ = ["KMSKEYS", "RESOLVER", "SHORT_TTL", "Install", "installed", "run_resolver"]


@pytest.fixture(scope="session")
def kms_backend() -> Iterator[tuple[KmsEmulator, KmsProxy, str]]:
    """The session's moto server, the counting proxy in front of it, and one KMS key ARN."""
    with kms_stack() as stack:
        yield stack


@pytest.fixture(scope="session")
def resolver_install(kms_backend: tuple[KmsEmulator, KmsProxy, str]) -> Iterator[Install]:
    """The session's resolver install (see the module docstring)."""
    emulator, proxy, key_arn = kms_backend
    names = (
        f'\n[names."{SHORT_TTL_GLOB}"]\nttl = {SHORT_TTL}\n'
        f'\n[names."{NOBODY_ONLY_GLOB}"]\nallow_users = ["nobody"]\n'
    )
    with installed(emulator, proxy, key_arn, names=names) as install:
        yield install


@pytest.fixture
def resolver(resolver_install: Install, session_keyring: object) -> Iterator[Install]:
    """The session install, in a fresh session keyring, with counts, faults and log reset."""
    with fresh(resolver_install):
        yield resolver_install


@pytest.fixture
def extra_install(
    kms_backend: tuple[KmsEmulator, KmsProxy, str], session_keyring: object
) -> Callable[..., Any]:
    """`with extra_install(allow_legacy_blobs=True) as other:` a second install for one test."""
    emulator, proxy, key_arn = kms_backend

    def make(**settings: Any) -> Any:
        return installed(emulator, proxy, key_arn, **settings)

    return make


@pytest.fixture(scope="session")
def sources_install(kms_backend: tuple[KmsEmulator, KmsProxy, str]) -> Iterator[Sources]:
    """The session's install that reads Secrets Manager and Parameter Store (sources.py)."""
    with sources_installed(*kms_backend) as sources:
        yield sources


@pytest.fixture
def sources(sources_install: Sources, session_keyring: object) -> Iterator[Sources]:
    """That install, in a fresh session keyring, with counts, faults and log reset."""
    with fresh(sources_install.install):
        yield sources_install


@pytest.fixture
def served(extra_install: Callable[..., Any]) -> Iterator[Install]:
    """An install whose misses the resolver daemon serves (deadline 3 s)."""
    with extra_install(daemon=True, deadline=3, daemon_wait=DAEMON_WAIT) as install:
        assert install.daemon is not None and install.proxy is not None
        install.proxy.reset_counts()
        yield install
