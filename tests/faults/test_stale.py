"""Stale on error: when KMS is unavailable, a host-cache entry within stale_grace answers.

One install (ttl 3 s, stale_grace 6 s, stale_ttl 3 s) and one timeline for three secrets, so that
the waits for entries to age are shared: A and C meet an outage, B a refusal.
"""

from __future__ import annotations

import errno
import re
import time
from collections.abc import Iterator

import pytest

from kmskeys import Key, Keyring, TemporarilyUnavailableError
from tests.faults.conftest import DEADLINE, FAULT_SETTINGS
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import DROP, KmsProxy, ProxiedRequest, kms_error
from tests.support.names import unique
from tests.support.requester import as_user
from tests.support.ttl import MIN_TTL, gone_after
from tests.upcall.harness import Install, installed

pytestmark = pytest.mark.faults

TTL = MIN_TTL
STALE_GRACE = 6
STALE_TTL = MIN_TTL


@pytest.fixture(scope="module")
def stale_install(fault_backend: tuple[KmsEmulator, KmsProxy, str]) -> Iterator[Install]:
    """An install whose host-cache entries turn stale after 3 s and may answer until 6 s."""
    emulator, proxy, key_arn = fault_backend
    with installed(
        emulator,
        proxy,
        key_arn,
        ttl=TTL,
        stale_grace=STALE_GRACE,
        stale_ttl=STALE_TTL,
        **FAULT_SETTINGS,
    ) as install:
        yield install


def _ask(install: Install, name: str, blob: str) -> bytes:
    return Key.request(install.description(name), blob).read()


def test_outage_is_served_stale_within_grace_and_refusals_at_once(
    stale_install: Install, session_keyring: object
) -> None:
    install = stale_install
    assert install.proxy is not None
    install.proxy.reset_counts()
    install.log.drain()
    a, b, c = unique("staleA"), unique("refusedB"), unique("graceC")
    blobs = {name: install.blob(f"kmst-{name}".encode(), name) for name in (a, b, c)}
    faults: dict[str, object] = {}

    def hook(request: ProxiedRequest) -> object:
        if request.operation != "Decrypt":
            return None
        # The body holds the encryption context, kmskeys_name among it.
        return next((f for n, f in faults.items() if n.encode() in request.body), None)

    install.proxy.set_fault(hook)
    try:
        for name, blob in blobs.items():
            assert _ask(install, name, blob) == f"kmst-{name}".encode()
        decrypted = time.monotonic()
        assert install.proxy.count("Decrypt") == 3
        install.log.drain()
        faults.update({a: DROP, c: DROP, b: kms_error("AccessDeniedException")})
        time.sleep(max(0.0, decrypted + TTL + 0.2 - time.monotonic()))  # past freshness

        # KMS down: another service's miss gets the stale payload, logged with its age.
        stale_session = Keyring.join_session()
        assert _ask(install, a, blobs[a]) == f"kmst-{a}".encode()
        stale_at = time.monotonic()
        line = install.log.wait_for(a)
        assert " outcome=stale " in line and " source=hostcache " in line, line
        age = re.search(r" age=(\d+) ", line)
        assert age and TTL <= int(age.group(1)) <= STALE_GRACE, line
        assert f" ttl={STALE_TTL} " in line, line

        # A refusal is never masked: at once, and the entry is gone (no stale answer later).
        # (In children, each in a session of its own: this one keeps A's stale key.)
        started = time.monotonic()
        assert as_user("root", lambda: _ask(install, b, blobs[b])) == {
            "error": "KeyRejectedError",
            "errno": errno.EKEYREJECTED,
        }
        assert time.monotonic() - started < DEADLINE
        assert " outcome=refused " in install.log.wait_for(b)
        faults[b] = DROP
        assert as_user("root", lambda: _ask(install, b, blobs[b])) == {
            "error": "TemporarilyUnavailableError",
            "errno": errno.EAGAIN,
        }
        assert " outcome=unavailable " in install.log.wait_for(b)

        # KMS recovers: the stale key expires within stale_ttl and the next request decrypts.
        del faults[a]
        time.sleep(max(0.0, stale_at + gone_after(STALE_TTL) - time.monotonic()))
        assert Keyring.session() == stale_session
        before = install.proxy.count("Decrypt")
        assert _ask(install, a, blobs[a]) == f"kmst-{a}".encode()
        line = install.log.wait_for(a)
        assert " outcome=ok " in line and " source=inline " in line, line
        assert install.proxy.count("Decrypt") == before + 1

        # Past stale_grace the entry no longer answers: EAGAIN, as without a host cache.
        time.sleep(max(0.0, decrypted + STALE_GRACE + 0.2 - time.monotonic()))
        Keyring.join_session()
        with pytest.raises(TemporarilyUnavailableError):
            _ask(install, c, blobs[c])
        assert " outcome=unavailable " in install.log.wait_for(c)
    finally:
        install.proxy.set_fault(None)
