"""Secret names and key descriptions: the one validator shared by client, encryptor and resolver.

A name becomes a kernel key description (`PREFIX:NAME`), a KMS encryption-context value and, on the
host, a path below the resolver's blob_dir: so it is checked here, before any syscall or open.
"""

# No `from __future__ import annotations` (every annotation here is valid at run time): this
# module and kmskeys/__init__.py are all the Python a cached get_secret in a fresh process reads.
from kmskeys import (
    DEFAULT_PASS_PREFIX,
    DEFAULT_PREFIX,
    DEFAULT_SSM_PREFIX,
    DEFAULT_STORED_PREFIX,
    DEFAULT_TOKEN_PREFIX,
)

MAX_NAME_BYTES = 200
MAX_PREFIX_BYTES = 32

# Plain character sets instead of `re`, which would cost the client's import path milliseconds.
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS = _ALNUM | frozenset("_./@+-")
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_PREFIX_CHARS = _LOWER | frozenset("0123456789_-")
# A reference's common shapes (see common_reference): kmskeys/awsname.py's FIELD and ssm: LABEL.
_FIELD_CHARS = _ALNUM | frozenset("_.@+-")
_LABEL_CHARS = _ALNUM | frozenset("_.-")
# The prefixes whose selectors only kmskeys/secretref.py reads (kms: and token: take none).
_OTHER_GRAMMARS = frozenset(
    (DEFAULT_PREFIX, DEFAULT_TOKEN_PREFIX, DEFAULT_PASS_PREFIX, DEFAULT_STORED_PREFIX)
)


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


def common_reference(ref: str | bytes, prefix: str = DEFAULT_PREFIX) -> str | None:
    """The description of a reference of a common shape, as kmskeys/secretref.py `described`
    gives it, or None: that module reads every other shape (and says what is wrong).

    The common shapes, which get_secret reads without loading the grammars: `PREFIX:NAME`;
    `NAME#FIELD` of `sm:` or of a prefix of the operator's own naming (whose selector any
    backend's grammar may accept: the sm: grammar accepts every `#FIELD`); `NAME#VERSION` (up
    to 18 digits) and `NAME#LABEL` of `ssm:`. Prefix and name are checked by the same calls, in
    the same order, as there, so a bad one fails the same way; a selector not of these shapes
    returns None (tests/unit/test_common_reference.py holds both readings to one answer).
    """
    if isinstance(ref, bytes):
        if not ref.isascii():
            return None
        ref = ref.decode("ascii")
    if not isinstance(ref, str) or not isinstance(prefix, str):
        return None
    head, colon, rest = ref.partition(":")
    if colon:
        if prefix not in (DEFAULT_PREFIX, head):
            return None  # two prefixes: secretref.py refuses, saying so
        prefix, ref = head, rest
    name, sep, selector = ref.partition("#")
    if sep and not _common_selector(prefix, selector):
        return None
    return f"{validate_prefix(prefix)}:{validate_name(name)}{sep}{selector}"


def _common_selector(prefix: str, selector: str) -> bool:
    # What follows the first `#`: true only where the full grammar accepts it as spelled.
    if prefix == DEFAULT_SSM_PREFIX:
        if selector.isascii() and selector.isdigit():
            return 0 < len(selector) <= 18 and selector[0] != "0"
        return (
            0 < len(selector) <= 100
            and _LABEL_CHARS.issuperset(selector)
            and not selector[0].isdigit()
            and selector[:3].lower() not in ("aws", "ssm")
        )
    if prefix in _OTHER_GRAMMARS:
        return False
    return 0 < len(selector) <= 128 and _FIELD_CHARS.issuperset(selector)


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
