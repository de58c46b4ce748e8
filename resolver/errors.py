"""Resolver failure classes, each answered to the requester with one errno (DESIGN.md)."""

from __future__ import annotations

import errno as _errno

from kmskeys.errors import REFUSED, UNAVAILABLE, UNKNOWN_SECRET, KmsKeysError


class ResolverError(KmsKeysError):
    """A request the resolver could not serve; `reason` goes to the log, `errno` to the kernel."""

    errno: int = REFUSED
    outcome = "refused"

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        # Worth another attempt within the same request (throttled, 5xx, connection refused).
        self.retryable = retryable


class UnknownSecretError(ResolverError):
    """No blob exists for this name (ENOKEY): deploy NAME.kms to blob_dir or pass it inline."""

    errno = UNKNOWN_SECRET
    outcome = "unknown"


class RefusedError(ResolverError):
    """The resolver refused (EKEYREJECTED): policy, name or user binding, expiry, bad blob."""

    errno = REFUSED
    outcome = "refused"


class UnavailableError(ResolverError):
    """KMS could not answer in time (EAGAIN): unreachable, throttled or past the deadline."""

    errno = UNAVAILABLE
    outcome = "unavailable"


class ConfigError(RefusedError):
    """The resolver's config file is missing, unsafe or invalid; fix it (docs/resolver.md)."""


class DeadlineExceeded(BaseException):
    """The handler's deadline passed.

    A BaseException on purpose: botocore and urllib3 catch `Exception` around retries, and the
    watchdog must never be swallowed there.
    """


def errno_name(err: int) -> str:
    """`ENOKEY` for 126, and so on; the number itself when unnamed."""
    return _errno.errorcode.get(err, str(err))
