"""Errors of the build side: one class, one exit code and one line of advice per failure.

Messages name keys, files, line numbers and AWS error codes, never a plaintext value.
"""

from __future__ import annotations

from kmskeys.errors import KmsKeysError

# Exit codes of `kmskeys encrypt / inspect / bundle` (docs/encryptor.md).
EXIT_OK = 0
EXIT_KMS = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4
EXIT_NO_CREDENTIALS = 10
EXIT_ACCESS_DENIED = 11
EXIT_KEY_UNAVAILABLE = 12
EXIT_NO_REGION = 13
EXIT_UNREACHABLE = 14
EXIT_THROTTLED = 15
EXIT_KMS_UNAVAILABLE = 16


class EncryptorError(KmsKeysError):
    """A build-side failure; the message says what to do, `exit_code` is the CLI's status."""

    exit_code = EXIT_KMS


class UsageError(EncryptorError, ValueError):
    """The options do not fit together; see `kmskeys COMMAND --help`."""

    exit_code = EXIT_USAGE


class InputError(EncryptorError, ValueError):
    """The secret, name, context, expiry, env file or blob is not acceptable; fix the input."""

    exit_code = EXIT_INPUT


class OutputError(EncryptorError, OSError):
    """The blob could not be written; check the output path and its directory's permissions."""

    exit_code = EXIT_OUTPUT


class KmsError(EncryptorError):
    """KMS refused the call for a reason kmskeys has no finer class for; read the AWS error code."""

    exit_code = EXIT_KMS


class NoCredentialsError(KmsError):
    """No usable AWS credentials; set a profile, environment credentials or an instance role."""

    exit_code = EXIT_NO_CREDENTIALS


class AccessDeniedError(KmsError, PermissionError):
    """The credentials may not use this key; grant kms:Encrypt / kms:GenerateDataKey on it."""

    exit_code = EXIT_ACCESS_DENIED


class KeyUnavailableError(KmsError, LookupError):
    """The KMS key does not exist here, or is disabled, pending deletion or of the wrong kind;
    check --key-id and --region, or enable the key."""

    exit_code = EXIT_KEY_UNAVAILABLE


class NoRegionError(KmsError):
    """No AWS region is configured; pass --region or set AWS_REGION."""

    exit_code = EXIT_NO_REGION


class EndpointUnreachableError(KmsError, ConnectionError):
    """KMS could not be reached; check the network, --endpoint-url and proxies, then retry."""

    exit_code = EXIT_UNREACHABLE


class ThrottledError(KmsError):
    """KMS kept throttling the requests after the standard retries; retry later, more slowly."""

    exit_code = EXIT_THROTTLED


class KmsUnavailableError(KmsError):
    """KMS failed this request on its side (internal error, key briefly unavailable, dependency
    timeout) after the standard retries; retry later."""

    exit_code = EXIT_KMS_UNAVAILABLE


def advice(cls: type[EncryptorError]) -> str:
    """The class docstring as one line, for appending to a message."""
    return " ".join((cls.__doc__ or "").split())
