"""KMS trouble is EAGAIN ("temporarily unavailable") within the deadline, cached only briefly."""

from __future__ import annotations

import errno
import time

import pytest

from kmskeys import KeyRejectedError, TemporarilyUnavailableError
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import DROP, ProxiedRequest, kms_error
from tests.support.names import unique
from tests.support.requester import as_user
from tests.support.ttl import gone_after
from tests.upcall.conftest import Install, installed

pytestmark = pytest.mark.upcall


def test_stopped_emulator_is_eagain_within_the_deadline(session_keyring: object) -> None:
    with KmsEmulator() as emulator:
        key_arn = emulator.client().create_key()["KeyMetadata"]["Arn"]
        with installed(emulator, None, key_arn, deadline=3) as install:
            name = unique("down")
            text = install.blob(b"x", name)
            emulator.stop()
            start = time.monotonic()
            with pytest.raises(TemporarilyUnavailableError) as caught:
                install.get(name, text)
            assert time.monotonic() - start < 3 + 1
            assert "journalctl -t kmskeys-resolver" in str(caught.value)
            line = install.log.wait_for(name)
            assert "outcome=unavailable" in line and "errno=EAGAIN" in line


def test_hanging_kms_is_eagain_within_the_deadline(resolver: Install) -> None:
    name = unique("hang")
    text = resolver.blob(b"x", name)
    assert resolver.proxy is not None
    resolver.proxy.set_fault(lambda request: time.sleep(15))
    start = time.monotonic()
    with pytest.raises(TemporarilyUnavailableError):
        resolver.get(name, text)
    assert time.monotonic() - start < resolver.settings["deadline"] + 1
    assert "outcome=unavailable" in resolver.log.wait_for(name)


@pytest.mark.parametrize(
    "fault",
    [
        lambda r: kms_error("ThrottlingException", 400),
        lambda r: kms_error("KMSInternalException", 500),
        lambda r: kms_error("ServiceUnavailable", 503),
        lambda r: DROP,
    ],
    ids=["throttled", "internal", "503", "dropped"],
)
def test_transient_kms_errors_are_eagain(resolver: Install, fault) -> None:  # type: ignore[no-untyped-def]
    name = unique("transient")
    text = resolver.blob(b"x", name)
    assert resolver.proxy is not None
    resolver.proxy.set_fault(fault)
    with pytest.raises(TemporarilyUnavailableError):
        resolver.get(name, text)
    assert "errno=EAGAIN" in resolver.log.wait_for(name)


@pytest.mark.parametrize(
    "code", ["AccessDeniedException", "DisabledException", "KMSInvalidStateException"]
)
def test_refusals_from_kms_are_ekeyrejected(resolver: Install, code: str) -> None:
    name = unique("denied")
    text = resolver.blob(b"x", name)
    assert resolver.proxy is not None
    resolver.proxy.set_fault(lambda r: kms_error(code, 400))
    with pytest.raises(KeyRejectedError):
        resolver.get(name, text)
    assert code in resolver.log.wait_for(name)


def test_wrong_key_id_in_the_answer_is_refused(resolver: Install) -> None:
    name = unique("keyid")
    text = resolver.blob(b"x", name)
    assert resolver.proxy is not None

    def other_key(request: ProxiedRequest) -> object:
        if request.operation != "Decrypt":
            return None
        from tests.support.kms_proxy import Fault

        body = b'{"KeyId":"arn:aws:kms:us-east-1:123456789012:key/other","Plaintext":"eA=="}'
        return Fault(200, body)

    resolver.proxy.set_fault(other_key)
    with pytest.raises(KeyRejectedError):
        resolver.get(name, text)
    assert "different KeyId" in resolver.log.wait_for(name)


def test_refusal_is_cached_for_negative_ttl_then_resolves_again(resolver: Install) -> None:
    name = unique("recover")
    text = resolver.blob(b"back", name)
    assert resolver.proxy is not None

    def fetch() -> str:
        return resolver.get(name, text).decode()

    # Requests run in children sharing this session keyring. The children have no process
    # keyring: with one, the kernel's search prefers "not found there" over a rejected key found
    # in the session keyring, and every request would upcall again.
    refused = {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}
    resolver.proxy.set_fault(lambda r: kms_error("AccessDeniedException", 400))
    assert as_user(0, fetch, session="inherit") == refused
    resolver.proxy.set_fault(None)
    # Within negative_ttl the refusal is served by the kernel, without an upcall.
    assert as_user(0, fetch, session="inherit") == refused
    assert resolver.decrypts() == 1
    time.sleep(gone_after(resolver.settings["negative_ttl"]))
    assert as_user(0, fetch, session="inherit") == {"ok": "back"}
    assert resolver.decrypts() == 2


def test_unavailable_is_never_cached_so_recovery_is_immediate(resolver: Install) -> None:
    name = unique("retry")
    text = resolver.blob(b"back", name)
    assert resolver.proxy is not None
    resolver.proxy.set_fault(lambda r: kms_error("ThrottlingException", 400))
    with pytest.raises(TemporarilyUnavailableError):
        resolver.get(name, text)
    with pytest.raises(TemporarilyUnavailableError):
        resolver.get(name, text)
    assert len([line for line in resolver.log.drain() if f" name={name} " in line]) == 2
    resolver.proxy.set_fault(None)
    # The kernel treats a key rejected with EAGAIN as absent, so the next request upcalls again.
    assert resolver.get(name, text) == b"back"
