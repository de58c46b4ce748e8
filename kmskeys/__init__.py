"""kmskeys: DPAPI for Linux fleets.

Secrets encrypted with AWS KMS at build time are resolved once per host by a root request-key
handler and served from the kernel key retention service. This package is the app client: it
needs only cffi and libkeyutils, and never imports boto3.

The top level is the safe tier: `get_secret`, `Key` and `Keyring` return a payload only from a
key this process's fsuid owns. `kmskeys.lowlevel` is the low-level tier, for the resolver side:
unchecked request and read, and the calls that answer, re-own and re-permission keys.
"""

from __future__ import annotations

from kmskeys.key import Key, Keyring, get_secret
from kmskeys.names import description, validate_name

TYPE_CHECKING = False  # not `from typing import`: typing costs milliseconds to import

if TYPE_CHECKING:
    from kmskeys.dpapi import protect, protect_bytes, unprotect, unprotect_with_description
    from kmskeys.errors import (
        InvalidArgumentError,
        InvalidNameError,
        KeyctlError,
        KeyExpiredError,
        KeyNotFoundError,
        KeyOwnershipError,
        KeyPermissionError,
        KeyRejectedError,
        KeyRevokedError,
        KeyTypeUnavailableError,
        KmsKeysError,
        NotAProtectBlobError,
        OperationNotPermittedError,
        OutOfMemoryError,
        PayloadTooLargeError,
        ProtectAuthenticationError,
        ProtectError,
        QuotaExceededError,
        ScopeNotAllowedError,
        TemporarilyUnavailableError,
        TruncatedProtectBlobError,
        UnknownKeyVersionError,
        WrongUserError,
    )
    from kmskeys.keydesc import KeyDescription

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Error classes load on first use (usually inside an `except` clause, which is evaluated only
    # when an exception propagates), keeping `import kmskeys` within its milliseconds budget.
    if name in _ERRORS:
        from kmskeys import errors

        return getattr(errors, name)
    if name == "KeyDescription":
        from kmskeys.keydesc import KeyDescription

        return KeyDescription
    if name in _DPAPI:
        # DPAPI needs `cryptography`: loaded on the first protect/unprotect, never on import.
        from kmskeys import dpapi

        return getattr(dpapi, name)
    raise AttributeError(f"module 'kmskeys' has no attribute {name!r}")


__all__ = [
    "InvalidArgumentError",
    "InvalidNameError",
    "Key",
    "KeyDescription",
    "KeyExpiredError",
    "KeyNotFoundError",
    "KeyOwnershipError",
    "KeyPermissionError",
    "KeyRejectedError",
    "KeyRevokedError",
    "KeyTypeUnavailableError",
    "KeyctlError",
    "Keyring",
    "KmsKeysError",
    "NotAProtectBlobError",
    "OperationNotPermittedError",
    "OutOfMemoryError",
    "PayloadTooLargeError",
    "ProtectAuthenticationError",
    "ProtectError",
    "QuotaExceededError",
    "ScopeNotAllowedError",
    "TemporarilyUnavailableError",
    "TruncatedProtectBlobError",
    "UnknownKeyVersionError",
    "WrongUserError",
    "description",
    "get_secret",
    "protect",
    "protect_bytes",
    "unprotect",
    "unprotect_with_description",
    "validate_name",
]

# Every exported name ending in "Error" lives in kmskeys.errors and is loaded by __getattr__.
_ERRORS = frozenset(name for name in __all__ if name.endswith("Error"))
_DPAPI = frozenset(("protect", "protect_bytes", "unprotect", "unprotect_with_description"))
