"""The KMS client the build side uses, and the mapping of botocore failures onto our errors.

AWS conventions: the usual credential chain, `--region/--profile/--endpoint-url` over
AWS_REGION / AWS_PROFILE / AWS_ENDPOINT_URL, and botocore's standard retry mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from encryptor.errors import (
    AccessDeniedError,
    EncryptorError,
    EndpointUnreachableError,
    KeyUnavailableError,
    KmsError,
    KmsUnavailableError,
    NoCredentialsError,
    NoRegionError,
    ThrottledError,
    UsageError,
    advice,
)
from kmskeys.contract import (
    AWS_ACCESS_DENIED,
    AWS_BAD_CREDENTIALS,
    AWS_CREDENTIALS_CONFIG,
    AWS_EXPIRED_CREDENTIALS,
    AWS_INVALID_CIPHERTEXT,
    AWS_KEY_STATE,
    AWS_NO_CREDENTIALS,
    AWS_NO_REGION,
    AWS_REFUSED,
    AWS_THROTTLED,
    AWS_TIMEOUT,
    AWS_TRANSIENT,
    AWS_UNREACHABLE,
    AWS_UNREADABLE,
    classify_aws_exception,
)

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

T = TypeVar("T")

USER_AGENT = "kmskeys-encryptor"
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 30

# The classes that are answers of AWS (an error code, or at least a status).
_ANSWERED = frozenset(
    (
        AWS_THROTTLED,
        AWS_TRANSIENT,
        AWS_EXPIRED_CREDENTIALS,
        AWS_BAD_CREDENTIALS,
        AWS_ACCESS_DENIED,
        AWS_KEY_STATE,
        AWS_INVALID_CIPHERTEXT,
        AWS_REFUSED,
        AWS_UNREADABLE,
    )
)
# What each class of AWS error code (kmskeys.contract) means for a KMS key on the build side.
_KEY_STATES = {
    "NotFoundException": "not found",
    "DisabledException": "disabled",
    "KMSInvalidStateException": "not in a usable state (disabled, pending deletion or import)",
    "InvalidKeyUsageException": "not a symmetric ENCRYPT_DECRYPT key",
}


def make_client(
    *, region: str | None = None, profile: str | None = None, endpoint_url: str | None = None
) -> KMSClient:
    """A KMS client: explicit options first, then AWS_REGION / AWS_PROFILE / AWS_ENDPOINT_URL."""
    import boto3
    import botocore.config
    import botocore.exceptions

    region = region or os.environ.get("AWS_REGION") or None
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    config = botocore.config.Config(
        retries={"mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        user_agent_extra=USER_AGENT,
    )
    try:
        # profile_name=None lets botocore read AWS_PROFILE itself.
        session = boto3.session.Session(profile_name=profile or None)
        return session.client("kms", region_name=region, endpoint_url=endpoint_url, config=config)
    except ValueError as exc:
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            raise classify(exc, "client") from exc
        # botocore rejects a malformed endpoint URL with a bare ValueError.
        raise UsageError(f"invalid --endpoint-url: {_one_line(str(exc))}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise classify(exc, "client") from exc


def call(operation: str, fn: Callable[..., T], **kwargs: Any) -> T:
    """Run one KMS call, turning every botocore failure into an EncryptorError (`raise from`)."""
    import botocore.exceptions

    try:
        return fn(**kwargs)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise classify(exc, operation, key_id=kwargs.get("KeyId")) from exc


def classify(exc: Exception, operation: str, *, key_id: str | None = None) -> EncryptorError:
    """The EncryptorError for a botocore exception raised by `operation` (never re-raises).

    The class comes from the one classification the resolver uses too
    (kmskeys.contract.classify_aws_exception); the build side maps it to its exit codes and,
    unlike the resolver, shows AWS's message: it holds no plaintext, and the operator needs it.
    """
    found = classify_aws_exception(exc)
    kind = found.kind
    if kind == AWS_NO_REGION:
        return NoRegionError(f"no AWS region configured - {advice(NoRegionError)}")
    if kind in (AWS_NO_CREDENTIALS, AWS_CREDENTIALS_CONFIG):
        return NoCredentialsError(f"{_one_line(str(exc))} - {advice(NoCredentialsError)}")
    if kind in (AWS_UNREACHABLE, AWS_TIMEOUT):
        return EndpointUnreachableError(
            f"KMS {operation}: {_one_line(str(exc))} - {advice(EndpointUnreachableError)}"
        )
    if kind not in _ANSWERED:  # botocore refused the parameters, or failed otherwise
        return KmsError(f"KMS {operation}: {_one_line(str(exc))}")
    message = _one_line(found.message)
    detail = f"KMS {operation}: {found.code or 'Unknown'}" + (f" ({message})" if message else "")
    key = f" {key_id!r}" if key_id else ""
    if kind == AWS_ACCESS_DENIED:
        return AccessDeniedError(f"{detail} - {advice(AccessDeniedError)}")
    if kind in (AWS_BAD_CREDENTIALS, AWS_EXPIRED_CREDENTIALS):
        return NoCredentialsError(
            f"{detail}: the credentials were rejected - {advice(NoCredentialsError)}"
        )
    if kind == AWS_KEY_STATE:
        state = _KEY_STATES.get(found.code, "not usable")
        return KeyUnavailableError(
            f"KMS key{key} is {state} ({found.code}) - {advice(KeyUnavailableError)}"
        )
    if kind == AWS_THROTTLED:
        return ThrottledError(f"{detail} - {advice(ThrottledError)}")
    if kind == AWS_TRANSIENT:
        return KmsUnavailableError(f"{detail} - {advice(KmsUnavailableError)}")
    return KmsError(detail)


def _one_line(text: str, limit: int = 300) -> str:
    # AWS messages never hold our plaintext, but they may span lines or run long.
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
