"""The protect blob: what `kmskeys.protect` and `kmskeys protect` write (docs/dpapi.md).

Stdlib only, no crypto: this module frames and parses; kmskeys.dpapi encrypts. A blob is a header
followed by a STREAM of AES-256-GCM chunks:

    header   magic "kmsdpapi" | u8 format 1 | u8 scope | u32 key version | u32 uid |
             u32 chunk size | 32-byte salt | 7-byte nonce prefix |
             u8 name_len | name | u16 desc_len | description (UTF-8)
    chunks   AES-GCM(chunk plaintext) || 16-byte tag, each chunk_size bytes of plaintext but the
             last; nonce = prefix || u32 chunk index || u8 last-chunk flag

The header is authenticated through the key: the per-blob key is derived from the master key with
HKDF over the whole header, so a changed header byte makes every chunk fail. The text form that
`protect()` returns is `kmsdp1:` + base64url (no padding) of the same bytes.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Callable

from kmskeys.errors import InvalidNameError, NotAProtectBlobError
from kmskeys.names import validate_name
from kmskeys.stored import MAX_VERSION, SCOPE_MACHINE, SCOPE_USER

TYPE_CHECKING = False  # not `from typing import`: a fresh `kmskeys unprotect` pays for typing
if TYPE_CHECKING:
    from typing import Self

MAGIC = b"kmsdpapi"
FORMAT = 1
TEXT_PREFIX = "kmsdp1:"
SALT_BYTES = 32
NONCE_PREFIX_BYTES = 7
TAG_BYTES = 16
MIN_CHUNK = 4096
MAX_CHUNK = 16 << 20  # bounds what a hostile header can make a reader allocate
DEFAULT_CHUNK = 1 << 20
MAX_DESCRIPTION_BYTES = 1024
MAX_CHUNKS = 2**32  # the u32 counter in the nonce
NO_UID = 0xFFFFFFFF  # the uid field of a machine-scope blob

_SCOPE_CODES = {SCOPE_USER: 1, SCOPE_MACHINE: 2}
_CODE_SCOPES = {code: scope for scope, code in _SCOPE_CODES.items()}
# magic, format, scope, key version, uid, chunk size, salt, nonce prefix, name length
_FIXED = struct.Struct(f">8sBBIII{SALT_BYTES}s{NONCE_PREFIX_BYTES}sB")
_U16 = struct.Struct(">H")
_URLSAFE_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_URLSAFE_VALUE = {char: value for value, char in enumerate(_URLSAFE_ALPHABET)}
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _bad(reason: str) -> NotAProtectBlobError:
    return NotAProtectBlobError(
        f"not a protect blob: {reason} (give unprotect what kmskeys protect wrote)"
    )


def _check_description(text: str) -> str:
    if not text.isprintable():
        raise ValueError("a protect description must be printable text (no control characters)")
    if len(text.encode()) > MAX_DESCRIPTION_BYTES:
        raise ValueError(f"a protect description is at most {MAX_DESCRIPTION_BYTES} bytes")
    return text


# Names that passed validate_name: a process opens many blobs of few names.
_VALID_NAMES: set[str] = set()

_FIELDS = (
    "scope",
    "name",
    "key_version",
    "uid",
    "chunk_size",
    "salt",
    "nonce_prefix",
    "description",
)


class ProtectHeader(tuple[str, str, int, "int | None", int, bytes, bytes, str]):
    """Everything a blob says about itself; authenticated only once a chunk decrypts under it.

    An immutable tuple of the header fields, checked on construction (not a dataclass: that
    module costs a fresh `kmskeys unprotect` over 10 ms to import).
    """

    __slots__ = ()

    def __new__(
        cls,
        *,
        scope: str,
        name: str,
        key_version: int,
        uid: int | None,
        chunk_size: int,
        salt: bytes,
        nonce_prefix: bytes,
        description: str = "",
    ) -> ProtectHeader:
        fields = (scope, name, key_version, uid, chunk_size, salt, nonce_prefix, description)
        return cls._checked(fields)

    @classmethod
    def _checked(cls, fields: tuple[str, str, int, int | None, int, bytes, bytes, str]) -> Self:
        """The header of these fields, in _FIELDS order, once checked (read_header's way in:
        keyword arguments cost a parse on every blob opened)."""
        scope, name, key_version, uid, chunk_size, salt, nonce_prefix, description = fields
        if scope not in _SCOPE_CODES:
            raise ValueError(f"scope must be {SCOPE_USER!r} or {SCOPE_MACHINE!r}")
        if name not in _VALID_NAMES:
            validate_name(name)
            if len(_VALID_NAMES) < 1024:
                _VALID_NAMES.add(name)
        if not 1 <= key_version <= MAX_VERSION:
            raise ValueError(f"key version must be in 1..{MAX_VERSION}")
        if (scope == SCOPE_USER) != (uid is not None) or not (uid is None or 0 <= uid < NO_UID):
            raise ValueError("a user-scope blob names its uid, a machine-scope blob none")
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk size must be in {MIN_CHUNK}..{MAX_CHUNK}")
        if len(salt) != SALT_BYTES or len(nonce_prefix) != NONCE_PREFIX_BYTES:
            raise ValueError("salt or nonce prefix has the wrong length")
        if description:
            _check_description(description)
        return tuple.__new__(cls, fields)

    @property
    def scope(self) -> str:
        """'user' or 'machine'."""
        return self[0]

    @property
    def name(self) -> str:
        """The master key's NAME."""
        return self[1]

    @property
    def key_version(self) -> int:
        """The master key's version."""
        return self[2]

    @property
    def uid(self) -> int | None:
        """The protecting uid (user scope), else None."""
        return self[3]

    @property
    def chunk_size(self) -> int:
        """Plaintext bytes per chunk."""
        return self[4]

    @property
    def salt(self) -> bytes:
        """The HKDF salt."""
        return self[5]

    @property
    def nonce_prefix(self) -> bytes:
        """The chunks' nonce prefix."""
        return self[6]

    @property
    def description(self) -> str:
        """The authenticated description."""
        return self[7]

    def replace(self, **changes: object) -> ProtectHeader:
        """A copy with some fields changed (and checked again)."""
        fields: dict[str, object] = {**dict(zip(_FIELDS, self, strict=True)), **changes}
        return ProtectHeader(**fields)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{k}={v!r}"
            for k, v in zip(_FIELDS, self, strict=True)
            if k not in ("salt", "nonce_prefix")
        )
        return f"ProtectHeader({shown})"

    def encode(self) -> bytes:
        """The header's exact bytes (the HKDF info covers all of them)."""
        scope, name, version, uid, chunk_size, salt, nonce_prefix, description = self
        raw_name = name.encode()
        desc = description.encode()
        fixed = _FIXED.pack(
            MAGIC,
            FORMAT,
            _SCOPE_CODES[scope],
            version,
            NO_UID if uid is None else uid,
            chunk_size,
            salt,
            nonce_prefix,
            len(raw_name),
        )
        return fixed + raw_name + _U16.pack(len(desc)) + desc


def read_header(read: Callable[[int], bytes]) -> tuple[ProtectHeader, bytes]:
    """Parse a header from `read(n)` (which returns up to n bytes); return it and its bytes.

    Total: any input gives a header or NotAProtectBlobError, whose reason never repeats input.
    """
    fixed = _read_exactly(read, _FIXED.size)
    if len(fixed) < len(MAGIC) or fixed[: len(MAGIC)] != MAGIC:
        raise _bad("it does not start with the kmsdpapi magic")
    if len(fixed) < _FIXED.size:
        raise _bad("the header is cut short")
    if fixed[len(MAGIC)] != FORMAT:
        raise _bad(f"unsupported format version {fixed[len(MAGIC)]}")
    # The name and the description's length in one read.
    name_len = fixed[-1]
    middle = _read_exactly(read, name_len + _U16.size)
    if len(middle) < name_len + _U16.size:
        raise _bad("the header is cut short")
    (desc_len,) = _U16.unpack_from(middle, name_len)
    if desc_len > MAX_DESCRIPTION_BYTES:
        raise _bad(f"its description is longer than {MAX_DESCRIPTION_BYTES} bytes")
    desc_raw = _read_exactly(read, desc_len) if desc_len else b""
    if len(desc_raw) < desc_len:
        raise _bad("the header is cut short")
    raw = fixed + middle + desc_raw
    return _decode(raw, name_len), raw


def parse_header(blob: bytes | bytearray | memoryview) -> tuple[ProtectHeader, bytes]:
    """read_header for a blob in memory: the same header or the same error, without reads."""
    view = memoryview(blob)
    size = _FIXED.size
    if len(view) >= size + _U16.size and view[: len(MAGIC)] == MAGIC and view[len(MAGIC)] == FORMAT:
        name_len = view[size - 1]
        end = size + name_len + _U16.size
        if len(view) >= end:
            desc_len = view[end - 2] << 8 | view[end - 1]
            if desc_len <= MAX_DESCRIPTION_BYTES and len(view) >= end + desc_len:
                raw = bytes(view[: end + desc_len])
                return _decode(raw, name_len), raw
    at = 0

    def read(size: int) -> bytes:  # every error is read_header's, in its order
        nonlocal at
        part = bytes(view[at : at + size])
        at += len(part)
        return part

    return read_header(read)


def _decode(raw: bytes, name_len: int) -> ProtectHeader:
    """The header whose complete bytes are `raw` (magic, format and lengths already checked)."""
    _magic, _fmt, scope_code, version, uid, chunk, salt, prefix, _ = _FIXED.unpack_from(raw)
    scope = _CODE_SCOPES.get(scope_code)
    if scope is None:
        raise _bad(f"unknown scope code {scope_code}")
    name_at = _FIXED.size
    try:
        name = raw[name_at : name_at + name_len].decode("ascii")  # ProtectHeader checks it
        description = raw[name_at + name_len + _U16.size :].decode("utf-8")
        user = None if scope == SCOPE_MACHINE and uid == NO_UID else uid
        fields = (scope, name, version, user, chunk, salt, prefix, description)
        header = ProtectHeader._checked(fields)
    except InvalidNameError:
        raise _bad("its name breaks the naming rules") from None
    except UnicodeDecodeError:
        raise _bad("its name or description is not valid text") from None
    except ValueError as exc:
        raise _bad(str(exc)) from None
    if header.encode() != raw:
        raise _bad("its header is not in canonical form")
    return header


def _read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    first = read(size)
    if len(first) == size or not first:
        return first
    parts = [first]
    left = size - len(first)
    while left > 0:
        part = read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def chunk_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    """The 96-bit nonce of chunk `index`: prefix, big-endian counter, last-chunk flag."""
    if not 0 <= index < MAX_CHUNKS:
        raise ValueError("a protect blob holds at most 2**32 chunks")
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def to_text(blob: bytes | bytearray | memoryview) -> str:
    """The one-line text form of a binary blob: `kmsdp1:` + base64url without padding."""
    encoded = binascii.b2a_base64(blob, newline=False).translate(_TO_URLSAFE).rstrip(b"=")
    return TEXT_PREFIX + encoded.decode("ascii")


def from_text(text: str | bytes) -> bytes:
    """The binary blob inside a text form; NotAProtectBlobError unless it is one."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    raw = raw.strip(b" \t\r\n")
    prefix = TEXT_PREFIX.encode()
    if not raw.startswith(prefix):
        raise _bad(f"text form must start with {TEXT_PREFIX!r}")
    body = raw[len(prefix) :]
    # One text per blob: standard characters, '=' or a length that no encoding has are refused
    # (strict mode does the alphabet), and so are unused trailing bits that are not zero.
    if b"+" in body or b"/" in body or b"=" in body or len(body) % 4 == 1:
        raise _bad("its text form is not base64url")
    try:
        data = binascii.a2b_base64(
            body.translate(_FROM_URLSAFE) + b"=" * (-len(body) % 4), strict_mode=True
        )
    except binascii.Error:
        raise _bad("its text form is not base64url") from None
    spare = {2: 0x0F, 3: 0x03}.get(len(body) % 4, 0)
    if body and _URLSAFE_VALUE[body[-1]] & spare:
        raise _bad("its text form is not canonical base64url")
    return data
