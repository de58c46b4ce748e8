"""`sm:` and `ssm:` misses through the resolver daemon, as through the handler (issue 23.1).

An install of the sources (tests/upcall/sources.py) with the resolver daemon on: its misses go
kmskeys-gate -> `kmskeys-resolver serve` -> the moto server over HTTP, and every rule the handler
applies holds there too: the allowlist and policy before any call, the requester's token bucket,
one host-cache entry for every uid, stale answers while the service is throttled, and the key
remembered for refresh-ahead. Each line is the daemon's own (its pid), with no import phase: no
interpreter started for the miss. tests/upcall/test_aws_sources*.py run the same cases through
the handler (and through the daemon with KMSKEYS_TEST_DAEMON=1).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest

from kmskeys import Key, KeyRejectedError, Keyring, TemporarilyUnavailableError
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy, aws_error, only
from tests.support.requester import NOBODY, as_user
from tests.support.ttl import MIN_TTL, gone_after
from tests.upcall.refreshing import purge_host_cache, refresh_once
from tests.upcall.sources import Sources, ask, sources_installed

pytestmark = pytest.mark.upcall

DB = {"username": "kmst-user", "password": "kmst-daemon-sm"}
BURST = 3


@pytest.fixture(scope="module")
def served_sources(kms_backend: tuple[KmsEmulator, KmsProxy, str]) -> Iterator[Sources]:
    """The sources install with its resolver daemon."""
    with sources_installed(*kms_backend, daemon=True) as sources:
        assert sources.install.daemon is not None
        try:
            yield sources
        finally:
            purge_host_cache(sources.sm_prefix)
            purge_host_cache(sources.ssm_prefix)


@pytest.fixture
def daemon_sources(served_sources: Sources, session_keyring: object) -> Iterator[Sources]:
    """That install, with counts, faults and log reset."""
    served_sources.proxy.set_fault(None)
    served_sources.proxy.reset_counts()
    served_sources.install.log.drain()
    try:
        yield served_sources
    finally:
        served_sources.proxy.set_fault(None)


def _by_daemon(sources: Sources, line: str) -> str:
    """The line, checked to be the daemon's own, with no interpreter start in its phases."""
    daemon = sources.install.daemon
    assert daemon is not None
    found = re.search(r"kmskeys-resolver\[(\d+)\]:", line)
    assert found and int(found.group(1)) == daemon.pid, line
    # A refusal before any call has no phases; an answer's name no import and no client built.
    phases = next((part for part in line.split() if part.startswith("t=")), "")
    assert "import" not in phases and "client" not in phases, line
    return line


def test_sm_and_ssm_misses_are_answered_by_the_daemon(daemon_sources: Sources) -> None:
    sources = daemon_sources
    name = sources.secret(DB)
    assert ask(sources.sm_desc(f"{name}#password")) == b"kmst-daemon-sm"
    line = _by_daemon(sources, sources.install.log.wait_for(name))
    assert " outcome=ok source=secretsmanager " in line and " field=password " in line, line
    assert "kmst-daemon-sm" not in line
    # Another uid, another field: the one host-cache entry answers, through the daemon.
    desc = sources.sm_desc(f"{name}#username")
    assert as_user(NOBODY, lambda: ask(desc).decode()) == {"ok": "kmst-user"}
    line = _by_daemon(sources, sources.install.log.wait_for(name))
    assert " source=hostcache " in line, line
    Keyring.join_session()
    assert json.loads(ask(sources.sm_desc(name))) == DB
    assert sources.calls() == 1

    parameter = sources.parameter("kmst-daemon-ssm")
    assert ask(sources.ssm_desc(parameter)) == b"kmst-daemon-ssm"
    line = _by_daemon(sources, sources.install.log.wait_for(parameter))
    assert " outcome=ok source=parameterstore " in line, line
    assert sources.calls("GetParameter") == 1


def test_the_daemon_refuses_what_the_allowlist_and_policy_refuse_without_a_call(
    daemon_sources: Sources,
) -> None:
    sources = daemon_sources
    outside = f"kmst-outside-{time.monotonic_ns()}"  # not kmst-*-sm*: outside sm_secrets
    with pytest.raises(KeyRejectedError):
        ask(sources.sm_desc(outside))
    line = _by_daemon(sources, sources.install.log.wait_for(outside))
    assert "not in sm_secrets" in line, line
    name = sources.secret("kmst-for-nobody", stem="smnobody")
    with pytest.raises(KeyRejectedError):
        ask(sources.sm_desc(name))  # root: the policy names nobody alone
    line = _by_daemon(sources, sources.install.log.wait_for(name))
    assert "policy: sm 'kmst-*-smnobody*'" in line, line
    assert as_user(NOBODY, lambda: ask(sources.sm_desc(name)).decode()) == {"ok": "kmst-for-nobody"}
    assert sources.calls() == 1  # nobody's; the refusals made none


def test_the_daemon_spends_the_requesters_bucket(
    kms_backend: tuple[KmsEmulator, KmsProxy, str], session_keyring: object
) -> None:
    # A bucket of BURST tokens that does not refill during the test (one token in ~17 min).
    slow = {"kms_rate_per_uid": 0.001, "kms_burst_per_uid": BURST, "host_cache": False}
    with sources_installed(*kms_backend, daemon=True, **slow) as sources:
        sources.proxy.reset_counts()
        names = [sources.secret(f"kmst-bucket-{i}") for i in range(BURST + 1)]
        results = [as_user(NOBODY, lambda n=n: ask(sources.sm_desc(n)).decode()) for n in names]
        assert results[:BURST] == [{"ok": f"kmst-bucket-{i}"} for i in range(BURST)], results
        assert results[BURST] == {"error": "TemporarilyUnavailableError", "errno": 11}, results
        lines = [_by_daemon(sources, sources.install.log.wait_for(n)) for n in names]
        assert f"uid {NOBODY} is over its KMS call rate" in lines[-1], lines[-1]
        # Root's bucket is its own: not spent by nobody's misses.
        assert ask(sources.sm_desc(names[-1])) == f"kmst-bucket-{BURST}".encode()
        assert sources.calls() == BURST + 1


def test_the_daemon_answers_stale_while_the_service_is_throttled(daemon_sources: Sources) -> None:
    sources = daemon_sources
    name = sources.secret({"password": "kmst-daemon-stale"}, stem="smshort")  # ttl MIN_TTL
    desc = sources.sm_desc(f"{name}#password")
    assert ask(desc) == b"kmst-daemon-stale"
    _by_daemon(sources, sources.install.log.wait_for(name))
    time.sleep(gone_after(MIN_TTL))  # the key and the entry's freshness are both past
    sources.proxy.set_fault(only("secretsmanager", aws_error("ThrottlingException")))
    Keyring.join_session()
    assert ask(desc) == b"kmst-daemon-stale"
    line = _by_daemon(sources, sources.install.log.wait_for(name))
    assert " outcome=stale source=hostcache " in line and "ThrottlingException" in line, line
    fresh = sources.secret("kmst-daemon-never")
    with pytest.raises(TemporarilyUnavailableError):
        ask(sources.sm_desc(fresh))


def test_a_key_the_daemon_answered_is_renewed_by_refresh_ahead(daemon_sources: Sources) -> None:
    sources = daemon_sources
    name = sources.secret({"password": "kmst-daemon-before"})
    key = Key.request(sources.sm_desc(f"{name}#password"), b"")
    assert key.read() == b"kmst-daemon-before"
    _by_daemon(sources, sources.install.log.wait_for(name))
    sources.sm().put_secret_value(
        SecretId=f"app/{name}", SecretString='{"password": "kmst-daemon-after"}'
    )
    purge_host_cache(sources.sm_prefix)  # as if the entry's ttl had run out
    # The daemon remembered the key it answered (keyrecords), as the handler does.
    done = refresh_once(sources.install)
    assert done[key.serial].startswith("renewed (ttl "), done
    assert key.read() == b"kmst-daemon-after"
