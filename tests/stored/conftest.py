"""Fixtures of the stored: and DPAPI tests: a real install, and requests as other uids.

`as_user` is the one place these tests become another user. Until the shared requester helper
(tests/support/requester.py) lands, it forks a child that stays euid 0 and sets only the fsuid
and fsgid: this machine refuses request-key upcalls from a non-root euid, and the kernel takes a
new key's owner, %u/%g and every key permission check from the fsuid.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator

import pytest

from tests.stored.harness import StoredInstall, stored_installed
from tests.support.names import TEST_TAG
from tests.support.reach import reach_checkout

# Names matching these globs are machine-scoped, or kept for user A alone; the sized ones are
# made at SIZED bytes by policy (machine scope, and user scope).
MACHINE_GLOB = f"{TEST_TAG}-*-machine-*"
A_ONLY_GLOB = f"{TEST_TAG}-*-aonly-*"
SIZED_MACHINE_GLOB = f"{TEST_TAG}-*-msized-*"
SIZED_USER_GLOB = f"{TEST_TAG}-*-usized-*"
SIZED = 48
# Two uids with no passwd entry and no keys: the kernel needs nothing more to keep them apart.
# Below 2**31: a requester with a larger fsuid never reaches the handler on this kernel.
UID_A = 2_000_000_000 + secrets.randbelow(1_000_000)
UID_B = UID_A + 1


def as_user(uid: int, func: Callable[[], object], *, gid: int | None = None) -> dict[str, object]:
    """func() run for the kernel as `uid` (fsuid) in a fresh session keyring, in a child.

    Returns {"ok": result} or {"error": class name, "errno": ..., "message": ...}; messages of
    kmskeys errors name uids and versions, never key bytes.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_end)
            reach_checkout()  # func's lazy imports are read with the fsuid
            libc = ctypes.CDLL(None, use_errno=True)
            for call in (libc.setfsuid, libc.setfsgid):  # int setfsuid(uid_t): ids are unsigned
                call.argtypes, call.restype = [ctypes.c_uint32], ctypes.c_uint32
            os.setgroups([])
            libc.setfsgid(uid if gid is None else gid)
            libc.setfsuid(uid)
            # setfsuid reports nothing on failure: the previous value it returns is the proof.
            if libc.setfsuid(uid) != uid:
                raise OSError("setfsuid did not take")
            from kmskeys import Keyring

            Keyring.join_session()
            result: dict[str, object] = {"ok": func()}
        except BaseException as exc:  # report every failure to the parent
            result = {
                "error": type(exc).__name__,
                "errno": getattr(exc, "errno", None),
                "message": str(exc),
            }
            code = 1
        try:
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    loaded: dict[str, object] = json.loads(data)
    return loaded


def _policy() -> str:
    return (
        f'\n[stored."{MACHINE_GLOB}"]\nscope = "machine"\n'
        f'\n[stored."{A_ONLY_GLOB}"]\nallow_users = [{UID_A}]\n'
        f'\n[stored."{SIZED_MACHINE_GLOB}"]\nscope = "machine"\nkey_size = {SIZED}\n'
        f'\n[stored."{SIZED_USER_GLOB}"]\nkey_size = {SIZED}\n'
    )


@pytest.fixture(scope="session")
def stored_install() -> Iterator[StoredInstall]:
    """The session's stored: install (policy: machine-scoped and A-only names)."""
    if shutil.which("keyctl") is None:
        pytest.fail("tier 'upcall' cannot run here; missing: the 'keyctl' command (keyutils)")
    # The herd test sends 50 first requests from 50 keyrings of one uid at once: more than the
    # default max_concurrent_per_uid (4), which would answer the rest EAGAIN at once (the limit
    # has its own tests in tests/isolation/test_trust.py).
    with stored_installed(names=_policy(), max_concurrent_per_uid=64) as install:
        yield install


@pytest.fixture
def stored(stored_install: StoredInstall, session_keyring: object) -> StoredInstall:
    """The session's install, in a fresh session keyring, with its log drained."""
    stored_install.log.drain()
    return stored_install
