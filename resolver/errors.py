"""Resolver failure classes, each answered to the requester with one errno (docs/design.md).

`answer_errno` is what the handler rejects the key with, i.e. the errno the requester will
receive; it is not `KmsKeysError.errno`, which on the client side is the errno received.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING

from kmskeys.contract import ERRNO_REFUSED, ERRNO_UNAVAILABLE, ERRNO_UNKNOWN_SECRET
from kmskeys.errors import KmsKeysError

if TYPE_CHECKING:
    from kmskeys.fileio import UntrustedFileError


class ResolverError(KmsKeysError):
    """A request the resolver could not serve; `reason` goes to the log, `answer_errno` to the
    kernel."""

    answer_errno: int = ERRNO_REFUSED
    outcome = "refused"
    # Logged at ERR rather than WARNING: someone must act (an outage, a damaged keystore).
    alarm = False

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        # Worth another attempt within the same request (throttled, 5xx, connection refused).
        self.retryable = retryable


class UnknownSecretError(ResolverError):
    """No blob exists for this name (ENOKEY): deploy NAME.kms to blob_dir or pass it inline."""

    answer_errno = ERRNO_UNKNOWN_SECRET
    outcome = "unknown"


class RefusedError(ResolverError):
    """The resolver refused (EKEYREJECTED): policy, name or user binding, expiry, bad blob."""

    answer_errno = ERRNO_REFUSED
    outcome = "refused"


class UnavailableError(ResolverError):
    """KMS could not answer in time (EAGAIN): unreachable, throttled or past the deadline."""

    answer_errno = ERRNO_UNAVAILABLE
    outcome = "unavailable"
    alarm = True


class ServiceUnavailableError(UnavailableError):
    """AWS (KMS, or the way to it) did not answer (EAGAIN): unreachable, throttled, 5xx, timed
    out, no credentials yet, a malformed answer. The one class a stale host-cache entry may
    answer for (not a uid over its own call rate, and never a refusal)."""


class IdentityError(RefusedError):
    """The requester of a program-bound name could not be identified beyond doubt, or its key
    could not go where only it may read it (EKEYREJECTED); the log line says why."""


class RequesterGoneError(UnavailableError):
    """The requester exited or is being killed (EAGAIN, never cached: a waiter retries)."""

    outcome = "gone"
    alarm = False


class IdentityUnclearError(UnavailableError):
    """Lines of /proc/keys that a key description forged claim the request's authorization key
    and disagree with the kernel's own (EAGAIN, never cached, so a forgery never makes a refusal
    stick); the log line names them: find the key that forges them (`kmskeys doctor`)."""


class QuotaError(ResolverError):
    """The requester's kernel key quota is full (EDQUOT): `kmskeys doctor` says how to raise it."""

    # Not one of the three classes: saying so (EDQUOT -> QuotaExceededError) is more useful to
    # the requester than "refused".
    answer_errno = _errno.EDQUOT
    outcome = "quota"


class KeystoreError(RefusedError):
    """The keystore is unsafe (owner, mode, a link) or unreadable (EKEYREJECTED); fix it as the
    log line says (docs/dpapi.md)."""

    alarm = True


class CorruptEntryError(KeystoreError):
    """A keystore entry fails its integrity check (EKEYREJECTED). It is never regenerated, since
    that would destroy what was protected under it: restore it from a backup."""


class ConfigError(RefusedError):
    """The resolver's config file is missing, unsafe or invalid; fix it (docs/resolver.md)."""

    def __init__(
        self, reason: str, *, key: str | None = None, refusal: UntrustedFileError | None = None
    ) -> None:
        super().__init__(reason)
        # The top-level key at fault, when one is (`kmskeys doctor` suggests its fix).
        self.key = key
        # The file or directory refused as untrusted, when that is the fault (selfcheck).
        self.refusal = refusal


class InstallError(KmsKeysError):
    """install or uninstall cannot proceed; the message says why and what to do."""


class DeadlineExceeded(BaseException):
    """The handler's deadline passed.

    A BaseException on purpose: botocore and urllib3 catch `Exception` around retries, and the
    watchdog must never be swallowed there.
    """


def failure(exc: BaseException, fired: bool = False) -> ResolverError:
    """The class a failure is answered with: once the watchdog has fired, always EAGAIN."""
    if isinstance(exc, DeadlineExceeded):
        return UnavailableError("deadline exceeded before KMS answered")
    if fired:
        # The signal surfaced as another exception (inside an import or a class creation,
        # say): a missed deadline, never a cached refusal.
        what = exc.reason if isinstance(exc, ResolverError) else type(exc).__name__
        return UnavailableError(f"deadline exceeded ({what})")
    if isinstance(exc, ResolverError):
        return exc
    if isinstance(exc, ImportError):
        # A resolver installed without its dependencies: loud (ERR), and not cached.
        return UnavailableError(
            f"missing dependency {exc.name or exc}: pip install 'kmskeys[resolver]'"
        )
    # A bug must still reject: a key left under construction would be negated silently.
    return RefusedError(f"internal error: {type(exc).__name__}")


def errno_name(err: int) -> str:
    """`ENOKEY` for 126, and so on; the number itself when unnamed."""
    return _errno.errorcode.get(err, str(err))
