"""Isolation-tier fixtures: two real test users (kmst-tagged, removed afterwards) and an install.

Per-user code runs in forked children made by the one requester helper
(tests/support/requester.py), under each kind of requester the session exercises; a resident
child keeps its keys alive while another user probes them.
"""

from __future__ import annotations

import pwd
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.support import user_keyrings
from tests.support.names import TEST_TAG
from tests.upcall.harness import Install, installed, kms_stack

# Names matching these globs may only be resolved by user A (by name, and by uid).
A_ONLY_GLOB = "kmst-*-aonly-*"
A_UID_GLOB = "kmst-*-auid-*"


def _missing() -> list[str]:
    tools = ("useradd", "userdel")
    return [f"the '{tool}' command (passwd)" for tool in tools if not shutil.which(tool)]


@pytest.fixture(scope="session")
def users() -> Iterator[tuple[pwd.struct_passwd, pwd.struct_passwd]]:
    """Users A and B, created for this run with useradd and deleted after, even on failure."""
    missing = _missing()
    if missing:
        pytest.fail("tier 'isolation' cannot run here; missing: " + "; ".join(missing))
    token = secrets.token_hex(3)
    names = [f"{TEST_TAG}-a-{token}", f"{TEST_TAG}-b-{token}"]
    created: list[str] = []
    try:
        for name in names:
            subprocess.run(
                ["useradd", "--system", "--user-group", "--no-create-home",
                 "--shell", "/usr/sbin/nologin", name],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
            created.append(name)
        yield pwd.getpwnam(names[0]), pwd.getpwnam(names[1])
    finally:
        for name in created:
            user_keyrings.forget([pwd.getpwnam(name).pw_uid])
            subprocess.run(["userdel", name], check=False, capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def iso_install(users: tuple[pwd.struct_passwd, pwd.struct_passwd]) -> Iterator[Install]:
    """A resolver install whose policy gives the a-only names to user A alone."""
    a, _ = users
    names = (
        f'\n[names."{A_ONLY_GLOB}"]\nallow_users = ["{a.pw_name}"]\n'
        f'\n[names."{A_UID_GLOB}"]\nallow_users = [{a.pw_uid}]\n'
    )
    with kms_stack() as stack, installed(*stack, names=names) as install:
        yield install


@pytest.fixture
def iso(iso_install: Install, session_keyring: object) -> Install:
    """The tier's install with counts and log reset."""
    assert iso_install.proxy is not None
    iso_install.proxy.reset_counts()
    iso_install.log.drain()
    return iso_install
