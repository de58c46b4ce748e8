"""One error root for kmskeys, and one class per keyctl errno (the resolver's classes included)."""

from __future__ import annotations

import errno as _errno
import os

from kmskeys.contract import (
    DEFAULT_PASS_PREFIX,
    DEFAULT_PREFIX,
    ERRNO_REFUSED,
    ERRNO_UNAVAILABLE,
    ERRNO_UNKNOWN_SECRET,
)

RESOLVER_LOG_HINT = (
    "see the resolver log: journalctl -t kmskeys-resolver (or syslog; dmesg on a host without "
    "/dev/log)"
)
# The errnos a negative key answers with until it expires (EAGAIN is never found again).
ERRNO_CACHED = (ERRNO_UNKNOWN_SECRET, ERRNO_REFUSED, _errno.EDQUOT)
# The errno alone does not say which of several causes it was: doctor checks each.
DOCTOR_HINT = "run `kmskeys doctor{option}` to check the set-up"
# EAGAIN on a `pass:` entry: the resolver answers a locked (or absent) gpg-agent with EAGAIN, so
# that the first request after unlocking resolves (EAGAIN is never cached); the errno cannot say
# "locked", so the client says what it most likely means (docs/tokens.md).
LOCKED_AGENT_ADVICE = (
    "the password store could not answer: most often your gpg-agent is locked or not running. "
    "Unlock it (e.g. `pass show {name}` once), then ask again: the next request after unlocking "
    "resolves (the resolver log says outcome=locked)"
)
# What the errno of a request that never reached the resolver means, beyond the class advice.
_UPCALL_CAUSES = {
    _errno.ENOKEY: (
        "no line in the resolver log means no resolver ran: no rule routes this prefix to it "
        "(not installed, or the app uses another prefix)"
    ),
    _errno.ENOENT: (
        "request-key never ran for this request: /sbin/request-key is missing, or this host "
        "refuses upcalls from non-root requesters"
    ),
    _errno.EPERM: (
        "keyctl system calls are blocked here: a seccomp filter such as Docker's default "
        "profile (docs/containers.md)"
    ),
    _errno.ENOSYS: (
        "keyctl system calls are blocked here: a seccomp filter such as Docker's default "
        "profile (docs/containers.md), or a kernel without CONFIG_KEYS"
    ),
}


class KmsKeysError(Exception):
    """Root of every kmskeys error; catch this to handle them all."""

    errno: int | None = None

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class InvalidNameError(KmsKeysError, ValueError):
    """The secret name breaks the naming rules; fix the name (see docs: `kms:NAME`)."""


class KeyctlError(KmsKeysError, OSError):
    """A keyctl call failed with an errno kmskeys has no finer class for; check the errno."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        KmsKeysError.__init__(self, message, errno=errno)
        self.strerror = message


class KeyNotFoundError(KeyctlError, LookupError):
    """No such key or secret (ENOKEY); check the name, and that a blob is deployed for it."""

    errno = _errno.ENOKEY


class KeyExpiredError(KeyctlError):
    """The key has expired (EKEYEXPIRED); request it again to re-resolve it."""

    errno = _errno.EKEYEXPIRED


class KeyRevokedError(KeyctlError):
    """The key was revoked (EKEYREVOKED); unlink it and request it again."""

    errno = _errno.EKEYREVOKED


class KeyRejectedError(KeyctlError):
    """The resolver refused this request (EKEYREJECTED): policy, wrong name or user, expired or
    invalid blob, or access denied at KMS; read the resolver log for the reason."""

    errno = _errno.EKEYREJECTED


class TemporarilyUnavailableError(KeyctlError):
    """KMS could not be reached in time (EAGAIN): unreachable, throttled or past the deadline;
    retry shortly (the kernel never caches this answer, so the next request asks KMS again)."""

    errno = _errno.EAGAIN


class QuotaExceededError(KeyctlError):
    """This user's kernel key quota is full (EDQUOT); run `kmskeys doctor` and raise
    /proc/sys/kernel/keys/maxkeys or maxbytes, or unlink unused keys."""

    errno = _errno.EDQUOT


class KeyPermissionError(KeyctlError, PermissionError):
    """The key's permissions deny this process (EACCES): it belongs to another user who shares a
    keyring with this process (a joined, inherited or `su`/`runuser` session). Run with a
    session keyring of your own (`exec keyctl session -` in a shell, KeyringMode=private under
    systemd); to share across this uid's sessions, use keyring="user" or "persistent"."""

    errno = _errno.EACCES


class KeyOwnershipError(KeyPermissionError):
    """A cached key under this name belongs to another uid, so kmskeys will not return its
    payload: this process shares a keyring with another user. Run with a session keyring of
    your own (`exec keyctl session -` in a shell, KeyringMode=private under systemd); to share
    across this uid's sessions, use keyring="user" or "persistent" (`kmskeys get --keyring
    user`)."""

    def __init__(self, message: str, *, serial: int, owner: int | None) -> None:
        super().__init__(message, errno=_errno.EACCES)
        self.serial = serial
        self.owner = owner


class OperationNotPermittedError(KeyctlError, PermissionError):
    """The operation needs a privilege this process lacks (EPERM); run as root or as the owner."""

    errno = _errno.EPERM


class InvalidArgumentError(KeyctlError, ValueError):
    """The kernel refused an argument (EINVAL): a payload, description or callout too long, or a
    serial that is not of the right kind; check sizes against the documented limits."""

    errno = _errno.EINVAL


class PayloadTooLargeError(KeyctlError, ValueError):
    """The payload is over the key type's limit (E2BIG/EDQUOT on size); a `user` key holds at most
    32767 bytes."""

    errno = _errno.E2BIG


class KeyTypeUnavailableError(KeyctlError):
    """The kernel does not support this key type (ENODEV); use the `user` key type."""

    errno = _errno.ENODEV


class OutOfMemoryError(KeyctlError, MemoryError):
    """The kernel ran out of memory for keys (ENOMEM); free keys or memory and retry."""

    errno = _errno.ENOMEM


_BY_ERRNO: dict[int, type[KeyctlError]] = {
    cls.errno: cls
    for cls in (
        KeyNotFoundError,
        KeyExpiredError,
        KeyRevokedError,
        KeyRejectedError,
        TemporarilyUnavailableError,
        QuotaExceededError,
        KeyPermissionError,
        OperationNotPermittedError,
        InvalidArgumentError,
        PayloadTooLargeError,
        KeyTypeUnavailableError,
        OutOfMemoryError,
    )
}


def foreign_key_error(description: str, serial: int, owner: int, me: int) -> KeyOwnershipError:
    """The error for a found key that this process's fsuid `me` does not own (owner -1: hidden)."""
    who = "another uid (its permissions hide which)" if owner < 0 else f"uid {owner}"
    message = (
        f"{description}: the cached key {serial} is owned by {who}, not by uid {me} - "
        + " ".join((KeyOwnershipError.__doc__ or "").split())
    )
    return KeyOwnershipError(message, serial=serial, owner=None if owner < 0 else owner)


def error_for_errno(
    err: int,
    what: str,
    *,
    upcall: bool = False,
    description: str | None = None,
    cached: str | None = None,
    cause: str | None = None,
) -> KeyctlError:
    """Return the exception for `err`; `what` names the call and key, never a payload.

    The message carries the class's advice, or `cause` when the caller knows what happened
    (kmskeys.cached: a failed upcall the kernel negated). For a request that could upcall
    (`upcall`), the kernel passes back only an errno, so the message also says `cached` (the
    negative key that holds the failure, found by kmskeys.cached), points to the resolver log,
    and to `kmskeys doctor` where the errno has several causes.
    """
    cls = _BY_ERRNO.get(err, KeyctlError)
    name = _errno.errorcode.get(err, str(err))
    message = f"{what}: {os.strerror(err)} [{name}]"
    if cause is not None:
        message += " - " + cause
    elif upcall and err in (_errno.EPERM, _errno.ENOSYS):
        pass  # not the class's "run as root": a seccomp filter refuses the call to everyone
    elif upcall and err == ERRNO_UNAVAILABLE and _is_pass(description):
        name = (description or "").partition(":")[2].partition("#")[0]
        message += " - " + LOCKED_AGENT_ADVICE.format(name=name)
    elif cls is not KeyctlError and cls.__doc__:
        message += " - " + " ".join(cls.__doc__.split())
    if not upcall:
        return cls(message, errno=err)
    notes = [] if cached is None else [cached]
    upcall_cause = None if cause is not None else _UPCALL_CAUSES.get(err)
    if cause is None and err in (ERRNO_UNKNOWN_SECRET, ERRNO_REFUSED, ERRNO_UNAVAILABLE):
        notes.append(RESOLVER_LOG_HINT)
    if upcall_cause is not None:
        notes.append(upcall_cause)
    if err in (ERRNO_UNKNOWN_SECRET, ERRNO_REFUSED) or cause or upcall_cause or cls is KeyctlError:
        # Not for EAGAIN (its causes are all the resolver's, and its log line names them), nor
        # where the class's own advice already says what to do (EDQUOT, EACCES).
        prefix = (description or "").partition(":")[0]
        option = f" --prefix {prefix}" if prefix and prefix != DEFAULT_PREFIX else ""
        notes.append(DOCTOR_HINT.format(option=option))
    if notes:
        message += " (" + "; ".join(notes) + ")"
    return cls(message, errno=err)


def _is_pass(description: str | None) -> bool:
    """Whether `description` names a `pass:` entry: the default pass prefix, or a selector."""
    prefix, _, rest = (description or "").partition(":")
    return prefix == DEFAULT_PASS_PREFIX or "#all" in rest or "#field=" in rest


# --- DPAPI: kmskeys.protect / unprotect (docs/dpapi.md) ------------------------------------------
# Each class is one exit code of `kmskeys protect` / `unprotect` (docs/cli.md).


class ProtectError(KmsKeysError):
    """A protect or unprotect failed; the message says why and what to do."""


class NotAProtectBlobError(ProtectError, ValueError):
    """The input is not a protect blob; give unprotect exactly what protect wrote."""


class WrongUserError(ProtectError, PermissionError):
    """A user-scope blob opens only for the uid that protected it; run unprotect as that user."""


class ProtectAuthenticationError(ProtectError):
    """The blob does not authenticate: wrong entropy, or the data was changed; use the entropy
    given at protect time, or restore the blob from an intact copy."""


class TruncatedProtectBlobError(ProtectAuthenticationError):
    """The blob ends early (a chunk or more is missing); restore it from an intact copy."""


class UnknownKeyVersionError(ProtectError, LookupError):
    """The host's keystore has no such version of the master key; restore the keystore, or
    unprotect on the host that protected the data."""


class ScopeNotAllowedError(ProtectError, PermissionError):
    """The resolver's policy gives this name another scope; protect with the scope the policy
    names, or have the admin change its [stored."GLOB"] rule."""
