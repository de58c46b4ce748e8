"""What each field of a kmskeys blob may hold, and the blob's two errors.

A leaf below kmskeys.blob (the format) that the encryptor shares: the encryption-context keys,
the metadata grammar, the expiry format and the recorded name, user and unit of a version-2
blob.
Stdlib only, like kmskeys.blob; docs/blob-format.md is the reference for every rule here.
"""

from __future__ import annotations

from datetime import UTC, datetime

from kmskeys.contract import UNIT_NAME_CHARS, UNIT_NAME_MAX, UNIT_SUFFIXES
from kmskeys.errors import InvalidNameError, KmsKeysError
from kmskeys.names import validate_name

# Encryption-context keys: the fixed contract shared by encryptor, resolver and terraform.
CONTEXT_NAME = "kmskeys_name"
CONTEXT_USER = "kmskeys_user"
# The requester's systemd unit, for a unit-bound blob: read by the resolver from the
# root-controlled part of the requester's cgroup (docs/security.md, "Secrets bound to a program").
CONTEXT_UNIT = "kmskeys_unit"
CONTEXT_NOT_AFTER = "kmskeys_not_after"
RESERVED_CONTEXT_PREFIX = "kmskeys_"

MAX_CONTEXT_KEY = 128
MAX_CONTEXT_VALUE = 1024
# glibc's LOGIN_NAME_MAX is 256 with the terminating NUL: a user name is at most 255 bytes.
MAX_USER_NAME = 255

_DIGITS = frozenset("0123456789")
_CONTEXT_KEY_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:/@+-"
)
# Portable user names (POSIX) plus '@' (directory users) and a trailing '$' (machine accounts).
_USER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@-$")
_UNIT_CHARS = frozenset(UNIT_NAME_CHARS)


class BlobFormatError(KmsKeysError, ValueError):
    """Not a valid kmskeys blob; re-run `kmskeys encrypt` and deploy its output unchanged."""

    lead = "invalid kmskeys blob: "

    def __init__(self, reason: str) -> None:
        super().__init__(f"{self.lead}{reason}")
        self.reason = reason


class BlobMismatchError(BlobFormatError):
    """The blob was made for another name, user or unit; deploy the one encrypted for this."""

    lead = ""


def check_recorded_name(name: str) -> str:
    """`name` if a version-2 blob may record it (a valid secret name), else BlobFormatError."""
    try:
        return validate_name(name)
    except InvalidNameError:
        raise BlobFormatError("the recorded name is not a valid secret name") from None


def check_user_name(user: str) -> str:
    """`user` if it can be a host user's name (1-255 of `A-Z a-z 0-9 _ . @ - $`), else raise."""
    if (
        not isinstance(user, str)
        or not 0 < len(user) <= MAX_USER_NAME
        or user[0] == "-"
        or not _USER_CHARS.issuperset(user)
    ):
        raise BlobFormatError(
            f"a user name is 1 to {MAX_USER_NAME} letters, digits and _ . @ - $, "
            "not starting with '-'"
        )
    return user


def check_unit_name(unit: str) -> str:
    """`unit` if it can be a systemd unit that holds processes (`nginx.service`), else raise."""
    if (
        not isinstance(unit, str)
        or not 0 < len(unit) <= UNIT_NAME_MAX
        or not _UNIT_CHARS.issuperset(unit)
        or not any(unit.endswith(s) and len(unit) > len(s) for s in UNIT_SUFFIXES)
    ):
        raise BlobFormatError(
            f"a unit name is 1 to {UNIT_NAME_MAX} letters, digits and : - _ . \\ @, ending in "
            + ", ".join(UNIT_SUFFIXES)
        )
    return unit


def check_recorded(
    version: int,
    recorded: tuple[str | None, str | None, str | None],
    binds: tuple[bool, bool],
) -> None:
    """Version 1 records nothing; version 2 records the (name, user, unit) it was made for: the
    name always, the user iff it binds one, the unit iff it binds one (`binds`: user, unit)."""
    name, user, unit = recorded
    binds_user, binds_unit = binds
    if version == 1:
        if recorded != (None, None, None):
            raise BlobFormatError("a version-1 blob records no name, user or unit")
        return
    if not isinstance(name, str):
        raise BlobFormatError("a version-2 blob records the name it was encrypted for")
    check_recorded_name(name)
    for what, value, bound, check in (
        ("user", user, binds_user, check_user_name),
        ("unit", unit, binds_unit, check_unit_name),
    ):
        if not bound:
            if value is not None:
                raise BlobFormatError(f"a blob that binds no {what} records none")
        elif not isinstance(value, str):
            raise BlobFormatError(f"a version-2 blob bound to a {what} records that {what}")
        else:
            check(value)


def check_context_key(key: str) -> str:
    """Return `key` if a blob may carry it as metadata (custom `K=V` or not_after), else raise."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_CONTEXT_KEY:
        raise BlobFormatError(f"context keys are 1 to {MAX_CONTEXT_KEY} characters")
    if not _CONTEXT_KEY_CHARS.issuperset(key):
        raise BlobFormatError("context keys may hold only letters, digits and _ . : / @ + -")
    if key.startswith(RESERVED_CONTEXT_PREFIX) and key != CONTEXT_NOT_AFTER:
        raise BlobFormatError(
            f"context keys starting with {RESERVED_CONTEXT_PREFIX!r} are reserved"
        )
    return key


def check_context_value(value: str) -> str:
    """Return `value` if it may be a context value (printable, 1-1024 UTF-8 bytes), else raise."""
    if not isinstance(value, str) or not value:
        raise BlobFormatError("context values must be non-empty")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_CONTEXT_VALUE:
        raise BlobFormatError(f"context values are at most {MAX_CONTEXT_VALUE} bytes")
    if not value.isprintable():
        raise BlobFormatError("context values must be printable (no control characters)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BlobFormatError("context values must be valid Unicode") from None
    return value


def format_not_after(when: datetime) -> str:
    """`when` as the context's expiry format, `YYYY-MM-DDTHH:MM:SSZ` in UTC."""
    if when.tzinfo is None:
        raise ValueError("not_after must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_not_after(value: str) -> datetime:
    """Parse `YYYY-MM-DDTHH:MM:SSZ` (exactly that form) into an aware UTC datetime."""
    # Checked by hand, not with `re` or strptime: both are slow imports on the client path.
    if (
        not isinstance(value, str)
        or len(value) != 20
        or value[4] != "-"
        or value[7] != "-"
        or value[10] != "T"
        or value[13] != ":"
        or value[16] != ":"
        or value[19] != "Z"
        or not _DIGITS.issuperset(value[0:4] + value[5:7] + value[8:10])
        or not _DIGITS.issuperset(value[11:13] + value[14:16] + value[17:19])
    ):
        raise BlobFormatError("not_after must look like YYYY-MM-DDTHH:MM:SSZ")
    try:
        return datetime(
            int(value[0:4]),
            int(value[5:7]),
            int(value[8:10]),
            int(value[11:13]),
            int(value[14:16]),
            int(value[17:19]),
            tzinfo=UTC,
        )
    except ValueError:
        raise BlobFormatError("not_after is not a real date and time") from None
