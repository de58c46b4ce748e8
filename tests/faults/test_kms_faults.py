"""Every KMS fault ends in its errno within deadline + 1 s, one log line, and no plaintext.

The proxy sits between the resolver and the moto server and misbehaves on Decrypt only. After
each fault clears, the next request succeeds: at once for EAGAIN (the kernel never caches it)
and after negative_ttl for EKEYREJECTED.
"""

from __future__ import annotations

import errno
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from kmskeys import KeyctlError, KeyRejectedError, TemporarilyUnavailableError
from tests.faults.conftest import DEADLINE, NEGATIVE_TTL
from tests.support.kms_emulator import free_port
from tests.support.kms_proxy import DROP, Fault, ProxiedRequest, kms_error
from tests.support.names import unique
from tests.support.ttl import gone_after
from tests.upcall.harness import Install, installed

pytestmark = pytest.mark.faults

Hook = Callable[[ProxiedRequest], object]


@dataclass(frozen=True)
class Case:
    """One fault: what the proxy does to Decrypt, the errno it must give, the logged reason."""

    make: Callable[[Install], Hook]
    error: type[KeyctlError]
    reason: str


def _on_decrypt(answer: Callable[[ProxiedRequest], object]) -> Callable[[Install], Hook]:
    def make(install: Install) -> Hook:
        def hook(request: ProxiedRequest) -> object:
            return answer(request) if request.operation == "Decrypt" else None

        return hook

    return make


def _sleep_then_forward(seconds: float) -> Callable[[Install], Hook]:
    def answer(request: ProxiedRequest) -> None:
        time.sleep(seconds)

    return _on_decrypt(answer)


def _answer_with(fault: Fault) -> Callable[[Install], Hook]:
    return _on_decrypt(lambda request: fault)


def _decrypt_answer(key_id: str, **extra: object) -> Fault:
    return Fault(200, json.dumps({"KeyId": key_id, **extra}).encode())


def _other_key_id(install: Install) -> Hook:
    other = install.key_arn.rsplit("/", 1)[0] + "/00000000-0000-0000-0000-000000000000"
    return _on_decrypt(lambda r: _decrypt_answer(other, Plaintext="eA=="))(install)


def _no_plaintext(install: Install) -> Hook:
    return _on_decrypt(lambda r: _decrypt_answer(install.key_arn))(install)


def _plaintext_not_base64(install: Install) -> Hook:
    return _on_decrypt(lambda r: _decrypt_answer(install.key_arn, Plaintext="%%%"))(install)


_TRUNCATED = Fault(
    200, b'{"KeyId":"arn:aws:kms:us-east-1:1:key/x","Plaintext":"', declared_length=400
)

CASES = {
    "hang": Case(_sleep_then_forward(DEADLINE + 3), TemporarilyUnavailableError, "deadline"),
    "slow-over-deadline": Case(
        _sleep_then_forward(DEADLINE + 0.5), TemporarilyUnavailableError, "deadline"
    ),
    "dropped": Case(_on_decrypt(lambda r: DROP), TemporarilyUnavailableError, "KMS unreachable"),
    "http-500-plain": Case(
        _answer_with(Fault(500, b"Internal Server Error", {"Content-Type": "text/plain"})),
        TemporarilyUnavailableError,
        "HTTP 500",
    ),
    "throttled": Case(
        _answer_with(kms_error("ThrottlingException", 400)),
        TemporarilyUnavailableError,
        "KMS ThrottlingException",
    ),
    "access-denied": Case(
        _answer_with(kms_error("AccessDeniedException", 400)),
        KeyRejectedError,
        "KMS AccessDeniedException",
    ),
    "disabled": Case(
        _answer_with(kms_error("DisabledException", 400)),
        KeyRejectedError,
        "KMS DisabledException",
    ),
    "invalid-state": Case(
        _answer_with(kms_error("KMSInvalidStateException", 400)),
        KeyRejectedError,
        "KMS KMSInvalidStateException",
    ),
    "invalid-ciphertext": Case(
        _answer_with(kms_error("InvalidCiphertextException", 400)),
        KeyRejectedError,
        "KMS InvalidCiphertextException",
    ),
    "truncated-body": Case(_answer_with(_TRUNCATED), TemporarilyUnavailableError, "KMS"),
    "garbage-body": Case(
        _answer_with(Fault(200, b"\x00\xff<html>not json")),
        TemporarilyUnavailableError,
        "malformed",
    ),
    "garbage-error-body": Case(
        _answer_with(Fault(400, b"}{ not json")), TemporarilyUnavailableError, "HTTP 400"
    ),
    "no-plaintext": Case(_no_plaintext, TemporarilyUnavailableError, "malformed"),
    "plaintext-not-base64": Case(_plaintext_not_base64, TemporarilyUnavailableError, "malformed"),
    "other-key-id": Case(_other_key_id, KeyRejectedError, "different KeyId"),
}


def _secret() -> bytes:
    # Distinctive and random: found anywhere it must not be, it can only have leaked from here.
    return b"kmst-plaintext-" + secrets.token_hex(16).encode()


def _lines_for(install: Install, name: str) -> list[str]:
    return [line for line in install.log.drain() if f" name={name} " in line]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fault_gives_its_errno_in_time_and_recovers(
    faulty: Install, case: str, capfd: pytest.CaptureFixture[str]
) -> None:
    spec = CASES[case]
    assert faulty.proxy is not None
    secret, name = _secret(), unique(case)
    text = faulty.blob(secret, name)
    faulty.proxy.set_fault(spec.make(faulty))
    start = time.monotonic()
    with pytest.raises(spec.error) as caught:
        faulty.get(name, text)
    elapsed = time.monotonic() - start
    assert elapsed < DEADLINE + 1, elapsed
    line = faulty.log.wait_for(name)
    assert f"errno={errno.errorcode[spec.error.errno or 0]}" in line, line
    assert spec.reason in line, line
    assert _lines_for(faulty, name) == []  # exactly one line for the request
    faulty.proxy.set_fault(None)
    if spec.error is KeyRejectedError:
        # A refusal is cached for negative_ttl (at least NEGATIVE_TTL - 1 s, the kernel rounding
        # to whole seconds): the kernel answers, the resolver is not run.
        before = faulty.decrypts()
        with pytest.raises(KeyRejectedError):
            faulty.get(name, text)
        assert faulty.decrypts() == before
        time.sleep(gone_after(NEGATIVE_TTL))
    # EAGAIN is never cached (the kernel's search treats it as "not found"): retry at once.
    assert faulty.get(name, text) == secret
    assert "outcome=ok" in faulty.log.wait_for(name)
    out, err = capfd.readouterr()
    for where in (line, str(caught.value), out, err):
        assert secret.decode() not in where
        assert secret.hex() not in where


def test_slow_answer_just_under_the_deadline_succeeds(faulty: Install) -> None:
    # An answer that arrives 1 s before the deadline must still be taken, not cut off by a
    # short read timeout. The proxy holds the Decrypt until then, counted from the request:
    # however long the handler took to start and import botocore (seconds, on a loaded host).
    assert faulty.proxy is not None
    secret, name = _secret(), unique("slowunder")
    text = faulty.blob(secret, name)

    def until_a_second_before_the_deadline(request: ProxiedRequest) -> None:
        time.sleep(max(0.0, start + DEADLINE - 1.0 - time.monotonic()))

    faulty.proxy.set_fault(_on_decrypt(until_a_second_before_the_deadline)(faulty))
    start = time.monotonic()
    assert faulty.get(name, text) == secret
    assert time.monotonic() - start < DEADLINE + 1
    assert faulty.decrypts() == 1
    assert "outcome=ok" in faulty.log.wait_for(name)


def test_throttled_twice_then_success_within_the_deadline(faulty: Install) -> None:
    assert faulty.proxy is not None
    secret, name = _secret(), unique("throttle2")
    text = faulty.blob(secret, name)
    answers = [kms_error("ThrottlingException", 400)] * 2

    def hook(request: ProxiedRequest) -> object:
        if request.operation == "Decrypt" and answers:
            return answers.pop()
        return None

    faulty.proxy.set_fault(hook)
    start = time.monotonic()
    assert faulty.get(name, text) == secret
    assert time.monotonic() - start < DEADLINE + 1
    assert faulty.decrypts() == 3
    assert "outcome=ok" in faulty.log.wait_for(name)


def test_throttled_until_retries_are_exhausted(faulty: Install) -> None:
    assert faulty.proxy is not None
    name = unique("throttled")
    text = faulty.blob(_secret(), name)
    faulty.proxy.set_fault(_answer_with(kms_error("ThrottlingException", 400))(faulty))
    start = time.monotonic()
    with pytest.raises(TemporarilyUnavailableError):
        faulty.get(name, text)
    assert time.monotonic() - start < DEADLINE + 1
    assert faulty.decrypts() >= 2  # it did retry
    line = faulty.log.wait_for(name)
    assert "ThrottlingException" in line and "errno=EAGAIN" in line


def test_connection_refused_is_eagain_and_recovers(faulty: Install) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = {"endpoint_url": closed, "deadline": DEADLINE, "negative_ttl": NEGATIVE_TTL}
    with installed(faulty.emulator, None, faulty.key_arn, **settings) as down:
        secret, name = _secret(), unique("refused")
        text = down.blob(secret, name)
        start = time.monotonic()
        with pytest.raises(TemporarilyUnavailableError):
            down.get(name, text)
        assert time.monotonic() - start < DEADLINE + 1
        line = down.log.wait_for(name)
        assert "errno=EAGAIN" in line and "KMS unreachable" in line, line
        assert secret.decode() not in line
    # The same blob through a working endpoint: nothing was cached, the request resolves.
    assert faulty.get(name, text) == secret
