"""Secret names and key descriptions: the one validator shared by client, encryptor and resolver.

A name becomes a kernel key description (`PREFIX:NAME`), a KMS encryption-context value and, on the
host, a path below the resolver's blob_dir: so it is checked here, before any syscall or open.
"""

# No `from __future__ import annotations` (every annotation here is valid at run time): a
# get_secret of a name that is not valid, or of a reference of an uncommon shape, reads this
# module (kmskeys/secretref.py `described`). A valid name and the common shapes are read in C
# (kmskeys/_names.h spells this grammar as this module does; tests/unit/test_names.py and
# test_common_reference.py hold the two to one answer).
from kmskeys import DEFAULT_PREFIX

MAX_NAME_BYTES = 200
MAX_PREFIX_BYTES = 32

# Plain character sets instead of `re`, which would cost the client's import path milliseconds.
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS = _ALNUM | frozenset("_./@+-")
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_PREFIX_CHARS = _LOWER | frozenset("0123456789_-")


def as_bytes(value: str | bytes, what: str) -> bytes:
    """`value` as the kernel takes a description, type or payload: bytes, a str as UTF-8."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


def _invalid(message: str) -> Exception:
    from kmskeys.errors import InvalidNameError

    return InvalidNameError(message)


def validate_name(name: str | bytes) -> str:
    """Return `name` as str if it is a valid secret name, else raise InvalidNameError."""
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            raise _invalid("secret name must be ASCII") from None
    if not isinstance(name, str):
        raise _invalid(f"secret name must be str or bytes, not {type(name).__name__}")
    if not name:
        raise _invalid("secret name is empty")
    if len(name) > MAX_NAME_BYTES:
        raise _invalid(f"secret name is longer than {MAX_NAME_BYTES} bytes")
    if name[0] not in _ALNUM or not _NAME_CHARS.issuperset(name):
        raise _invalid(
            f"secret name {_shown(name)} must start with a letter or digit and contain only "
            "letters, digits and _ . / @ + -"
        )
    # Names map to files below blob_dir: no parent references, no empty or '.' path segments.
    if ".." in name:
        raise _invalid(f"secret name {_shown(name)} must not contain '..'")
    if any(segment in ("", ".") for segment in name.split("/")):
        raise _invalid(f"secret name {_shown(name)} has an empty or '.' path segment")
    return name


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if it is a valid description namespace (e.g. `kms`), else raise."""
    if (
        not isinstance(prefix, str)
        or not 0 < len(prefix) <= MAX_PREFIX_BYTES
        or prefix[0] not in _LOWER
        or not _PREFIX_CHARS.issuperset(prefix)
    ):
        raise _invalid(
            f"description prefix {_shown(str(prefix))} must match [a-z][a-z0-9_-]{{0,31}}"
        )
    return prefix


def description(name: str | bytes, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the kernel key description `PREFIX:NAME` for a validated name.

    (What an application names may also hold a selector or a prefix of its own:
    kmskeys/secretref.py reads those, `sm:prod/db#password`.)
    """
    return f"{validate_prefix(prefix)}:{validate_name(name)}"


def is_reference(name: object) -> bool:
    """True if `name` holds a `:` or a `#`: a reference for kmskeys/secretref.py to read, never
    a plain name (both are outside the name alphabet)."""
    if isinstance(name, str):
        return ":" in name or "#" in name
    return isinstance(name, bytes) and (b":" in name or b"#" in name)


def parse_description(desc: str | bytes, prefix: str = DEFAULT_PREFIX) -> str:
    """Return NAME from a `PREFIX:NAME` description, or raise InvalidNameError."""
    if isinstance(desc, bytes):
        try:
            desc = desc.decode("ascii")
        except UnicodeDecodeError:
            raise _invalid("key description must be ASCII") from None
    head, sep, name = desc.partition(":")
    if not sep or head != prefix:
        raise _invalid(f"key description must start with {prefix!r}:")
    return validate_name(name)


def _shown(name: str) -> str:
    # Names are not secret, but a hostile one may be huge or hold control characters.
    return repr(name[:64] + ("…" if len(name) > 64 else ""))
