"""The AWS gateway: the allowlist, the budget, retries and the one classification, applied once.

Real botocore clients answer from botocore's own Stubber (its parsers and exceptions run); the
operation here is a Secrets Manager read, to show that a new service plugs in as an operation
with an allowlist of its own (resolver/gateway.py).
"""

from __future__ import annotations

import errno
import time
from typing import Any

import pytest
from botocore import exceptions as bx
from botocore.session import get_session
from botocore.stub import Stubber

from encryptor import errors as build_errors
from encryptor.kms import classify as build_classify
from kmskeys.contract import classify_aws_exception
from resolver.backend import Timings
from resolver.config import Config, parse
from resolver.errors import (
    ConfigError,
    RefusedError,
    ServiceUnavailableError,
    UnavailableError,
)
from resolver.gateway import Gateway, Target, failure
from tests.backends.contract import MemoryBudget

pytestmark = pytest.mark.unit

SECRET = "arn:aws:secretsmanager:us-east-1:111122223333:secret:kmst-db-AbCdEf"


class SecretRead:
    """GetSecretValue of one listed secret: a gateway operation like KMS Decrypt."""

    service = "secretsmanager"
    label = "Secrets Manager"
    method = "get_secret_value"
    phase = "secret"

    def __init__(self, secret: str, allowed: tuple[str, ...]) -> None:
        self.secret, self.allowed = secret, allowed

    def authorize(self, config: Config) -> Target:
        if self.secret not in self.allowed:
            raise RefusedError(f"secret not allowed: {self.secret}")
        return Target(self.secret, self.secret.split(":")[3])

    def plan(self, config: Config, target: Target) -> tuple[list[Target], str]:
        return [target], ""

    def params(self, target: Target) -> dict[str, Any]:
        return {"SecretId": target.resource}

    def answer(self, target: Target, response: dict[str, Any]) -> bytes:
        if response.get("ARN") != target.resource:
            raise RefusedError("Secrets Manager answered for another secret")
        return str(response["SecretString"]).encode()

    def invalid_request(self) -> str:
        return "not a valid Secrets Manager request"


class Clients:
    """Hands out one stubbed client; counts how many the gateway asked for."""

    def __init__(self, stub: Any) -> None:
        self.stub, self.built = stub, 0

    def client(self, service: str, region: str, deadline: float, timings: Timings) -> Any:
        self.built += 1
        return self.stub


def _gateway() -> tuple[Gateway, Stubber, Clients]:
    client = get_session().create_client(
        "secretsmanager", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    stubber = Stubber(client)
    stubber.activate()
    clients = Clients(client)
    return Gateway(parse({}), clients), stubber, clients


def _ok(stubber: Stubber) -> None:
    stubber.add_response(
        "get_secret_value", {"ARN": SECRET, "SecretString": "kmst-value"}, {"SecretId": SECRET}
    )


def test_a_new_operation_goes_through_its_own_allowlist_first() -> None:
    gateway, _stubber, clients = _gateway()
    with pytest.raises(RefusedError, match="secret not allowed"):
        gateway.authorize(SecretRead(SECRET, ()))
    assert clients.built == 0


def test_each_call_and_retry_spends_the_budget() -> None:
    gateway, stubber, clients = _gateway()
    for _ in range(2):
        stubber.add_client_error("get_secret_value", "ThrottlingException", http_status_code=400)
    _ok(stubber)
    budget = MemoryBudget()
    call = gateway.authorize(SecretRead(SECRET, (SECRET,)))
    timings = Timings()
    assert gateway.call(call, budget, time.monotonic() + 5, timings) == b"kmst-value"
    assert budget.spent == 3 and clients.built == 1 and "secret" in timings.phases
    stubber.assert_no_pending_responses()


def test_an_empty_budget_builds_no_client_and_is_eagain() -> None:
    gateway, _stubber, clients = _gateway()
    call = gateway.authorize(SecretRead(SECRET, (SECRET,)))
    with pytest.raises(UnavailableError, match="budget is empty") as raised:
        gateway.call(call, MemoryBudget(0), time.monotonic() + 5, Timings())
    assert raised.value.answer_errno == errno.EAGAIN and clients.built == 0


def test_no_retry_once_the_deadline_leaves_too_little() -> None:
    gateway, stubber, _clients = _gateway()
    stubber.add_client_error("get_secret_value", "ThrottlingException", http_status_code=400)
    _ok(stubber)  # never reached
    budget = MemoryBudget()
    call = gateway.authorize(SecretRead(SECRET, (SECRET,)))
    with pytest.raises(ServiceUnavailableError, match="Secrets Manager ThrottlingException"):
        gateway.call(call, budget, time.monotonic() + 0.1, Timings())
    assert budget.spent == 1


def test_a_refusal_is_never_retried_and_an_answer_is_checked() -> None:
    gateway, stubber, _clients = _gateway()
    stubber.add_client_error("get_secret_value", "AccessDeniedException", http_status_code=400)
    call = gateway.authorize(SecretRead(SECRET, (SECRET,)))
    with pytest.raises(RefusedError, match=r"^Secrets Manager AccessDeniedException$"):
        gateway.call(call, MemoryBudget(), time.monotonic() + 5, Timings())
    stubber.add_response("get_secret_value", {"ARN": SECRET + "x", "SecretString": "v"})
    with pytest.raises(RefusedError, match="another secret"):
        gateway.call(call, MemoryBudget(), time.monotonic() + 5, Timings())


def _client_error(code: str, status: int) -> bx.ClientError:
    return bx.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "Decrypt",
    )


CASES = [
    # exception, resolver class, retried, encryptor class
    (_client_error("ThrottlingException", 400), ServiceUnavailableError, True, "ThrottledError"),
    (
        _client_error("KMSInternalException", 500),
        ServiceUnavailableError,
        True,
        "KmsUnavailableError",
    ),
    (
        _client_error("ExpiredTokenException", 400),
        ServiceUnavailableError,
        True,
        "NoCredentialsError",
    ),
    (_client_error("AccessDeniedException", 400), RefusedError, False, "AccessDeniedError"),
    (_client_error("DisabledException", 400), RefusedError, False, "KeyUnavailableError"),
    (_client_error("InvalidCiphertextException", 400), RefusedError, False, "KmsError"),
    (_client_error("503", 503), ServiceUnavailableError, False, "KmsError"),
    (bx.NoCredentialsError(), ServiceUnavailableError, False, "NoCredentialsError"),
    (bx.ProfileNotFound(profile="p"), ConfigError, False, "NoCredentialsError"),
    (
        bx.ReadTimeoutError(endpoint_url="u"),
        ServiceUnavailableError,
        False,
        "EndpointUnreachableError",
    ),
    (
        bx.EndpointConnectionError(endpoint_url="u"),
        ServiceUnavailableError,
        True,
        "EndpointUnreachableError",
    ),
    (bx.ParamValidationError(report="r"), RefusedError, False, "KmsError"),
    (bx.NoRegionError(), ServiceUnavailableError, False, "NoRegionError"),
    (ValueError("garbled body"), ServiceUnavailableError, False, "KmsError"),
]


@pytest.mark.parametrize(("exc", "resolver_class", "retried", "build_class"), CASES, ids=repr)
def test_one_classification_for_the_resolver_and_the_encryptor(
    exc: Exception, resolver_class: type, retried: bool, build_class: str
) -> None:
    found = classify_aws_exception(exc)
    op = SecretRead(SECRET, (SECRET,))
    error = failure(exc, op)
    assert type(error) is resolver_class
    assert error.retryable is retried is found.retryable
    assert "m" not in error.reason.split()  # AWS's message never reaches the log
    assert type(build_classify(exc, "Decrypt")).__name__ == build_class
    assert issubclass(getattr(build_errors, build_class), build_errors.EncryptorError)
