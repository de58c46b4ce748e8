"""The kmskeys blob: one versioned line of text that carries a KMS-encrypted secret.

Written by the encryptor, read by the resolver and `kmskeys inspect`. Stdlib only: the client
side imports this module and must never pull in boto3 or cryptography. The format is documented
in docs/blob-format.md; keep the two in step.

    kmsk2:<base64url, no padding, of the v2 body>     (kmsk1: blobs are read too)

The encryption context always takes the secret's name, the requesting user and (for a
unit-bound blob) the requester's systemd unit from the request, never from the blob. A
version-2 blob also records the name (and user, and unit) it was encrypted for, so that a blob
deployed under another name is refused locally, with both names, before any KMS call: a check,
never the binding (KMS still checks the context).
"""

from __future__ import annotations

import base64
import binascii
import struct
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from kmskeys.blobfields import (
    CONTEXT_NAME,
    CONTEXT_NOT_AFTER,
    CONTEXT_UNIT,
    CONTEXT_USER,
    MAX_CONTEXT_KEY,
    MAX_CONTEXT_VALUE,
    RESERVED_CONTEXT_PREFIX,
    BlobFormatError,
    BlobMismatchError,
    check_context_key,
    check_context_value,
    check_recorded,
    format_not_after,
    parse_not_after,
)
from kmskeys.contract import USER_PAYLOAD_MAX

PREFIX = "kmsk"
VERSION = 2  # what the encryptor writes
VERSIONS = (1, 2)  # what this kmskeys reads: version 1 records no name, user or unit
MAX_BLOB_CHARS = 64 * 1024

MODE_DIRECT = "direct"
MODE_ENVELOPE = "envelope"
MODE_LEGACY = "legacy"

# Limits that keep every field well inside what KMS and the kernel accept.
MAX_KEY_ARN = 2048
MAX_KMS_CIPHERTEXT = 6144  # KMS CiphertextBlob is at most 6144 bytes
MAX_METADATA = 16
NONCE_BYTES = 12  # AES-GCM's standard 96-bit nonce
TAG_BYTES = 16
MAX_SEALED = USER_PAYLOAD_MAX + TAG_BYTES  # what opens must fit a `user` key

_MODE_CODES = {MODE_DIRECT: 1, MODE_ENVELOPE: 2}
_CODE_MODES = {code: mode for mode, code in _MODE_CODES.items()}
_FLAG_BINDS_USER = 0x01
# The resolver must add kmskeys_unit, the requester's unit. A reader from before it refuses the
# blob ("unknown flags set"): it never decrypts such a blob without the binding.
_FLAG_BINDS_UNIT = 0x02
_KNOWN_FLAGS = _FLAG_BINDS_USER | _FLAG_BINDS_UNIT
# The AAD layout's own version, not the blob's: a recorded name or user only gates requests, so
# a version-2 envelope seals exactly as its version-1 form does (see Blob.identity).
_AAD_VERSION = 1

_URLSAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_STANDARD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_DIGITS = frozenset("0123456789")
_WHITESPACE = " \t\r\n"
_AAD_MAGIC = b"kmsk-envelope-aad"


@dataclass(frozen=True)
class Blob:
    """A parsed blob; build one with `parse_blob`, write one with `to_text`."""

    version: int
    mode: str
    key_arn: str | None
    binds_user: bool
    metadata: Mapping[str, str] = field(default_factory=dict)
    ciphertext: bytes = b""
    nonce: bytes | None = None
    sealed: bytes | None = None
    # Version 2: the name it was encrypted for, and the user and unit if it binds them. Not
    # secret: the same values are the KMS context, which CloudTrail records in clear.
    name: str | None = None
    user: str | None = None
    binds_unit: bool = False
    unit: str | None = None

    def __post_init__(self) -> None:
        _check(self)
        # Frozen means frozen: a read-only, key-sorted copy of the caller's mapping.
        ordered = dict(sorted(self.metadata.items()))
        object.__setattr__(self, "metadata", types.MappingProxyType(ordered))

    def __hash__(self) -> int:
        return hash((self.version, self.mode, self.key_arn, self.name, self.ciphertext))

    def __repr__(self) -> str:
        # Ciphertext is not secret, but pages of hex help nobody reading a log or a test failure.
        return (
            f"Blob(version={self.version}, mode={self.mode!r}, name={self.name!r}, "
            f"user={self.user!r}, unit={self.unit!r}, key_arn={self.key_arn!r}, "
            f"binds_user={self.binds_user}, binds_unit={self.binds_unit}, "
            f"metadata={dict(self.metadata)!r}, ciphertext=<{len(self.ciphertext)} bytes>, "
            f"sealed=<{len(self.sealed or b'')} bytes>)"
        )

    @property
    def not_after(self) -> datetime | None:
        """The authenticated expiry (UTC), or None when the blob does not expire."""
        value = self.metadata.get(CONTEXT_NOT_AFTER)
        return None if value is None else parse_not_after(value)

    @property
    def size(self) -> int:
        """Length of the blob's text form in characters (what a callout or file must hold)."""
        return len(self.to_text())

    def check_request(self, name: str | None, user: str | None, unit: str | None = None) -> None:
        """Raise BlobMismatchError if this blob records another name than `name`, another user
        than `user` or another unit than `unit` (each when given): what KMS would refuse, found
        locally."""
        if self.name is not None and name is not None and name != self.name:
            raise BlobMismatchError(f"blob was encrypted for {self.name!r}, not {name!r}")
        if self.user is not None and user is not None and user != self.user:
            raise BlobMismatchError(f"blob was encrypted for user {self.user!r}, not {user!r}")
        if self.unit is not None and unit is not None and unit != self.unit:
            raise BlobMismatchError(f"blob was encrypted for unit {self.unit!r}, not {unit!r}")

    def encryption_context(
        self, name: str, user: str | None, unit: str | None = None
    ) -> dict[str, str]:
        """The KMS EncryptionContext for a request for `name` by `user` (in `unit`).

        `name`, `user` and `unit` come from the request (the unit from the requester's cgroup),
        never from the blob; a blob that records others raises BlobMismatchError first. Legacy
        blobs were encrypted without any context, so theirs is empty.
        """
        if self.mode == MODE_LEGACY:
            return {}
        if not isinstance(name, str) or not name:
            raise BlobFormatError("the request supplied no secret name")
        self.check_request(name, user, unit)
        context = {CONTEXT_NAME: name}
        if self.binds_user:
            if not isinstance(user, str) or not user:
                raise BlobFormatError("blob is bound to a user but the request supplied none")
            context[CONTEXT_USER] = user
        if self.binds_unit:
            if not isinstance(unit, str) or not unit:
                raise BlobFormatError("blob is bound to a unit but the request supplied none")
            context[CONTEXT_UNIT] = unit
        context.update(self.metadata)
        return context

    def identity(self) -> str:
        """The canonical text of what this blob decrypts to, the same for every spelling and
        version of it: its version-1 text (a recorded name or user only gates requests), or
        the legacy text. The host cache keys its entries on this (with the user and unit of
        a blob bound to them)."""
        if self.mode == MODE_LEGACY:
            return self.to_text()
        return _text(1, _encode_body(self, 1))

    def to_text(self) -> str:
        """The one-line text form, `kmsk2:...` (or bare standard base64 for legacy blobs)."""
        if self.mode == MODE_LEGACY:
            return base64.b64encode(self.ciphertext).decode("ascii")
        return _text(self.version, _encode_body(self, self.version))


def parse_blob(text: str | bytes, *, allow_legacy: bool = False) -> Blob:
    """Parse blob text (surrounding whitespace ignored) or raise BlobFormatError with a reason.

    Total and bounded: any input yields a Blob or one BlobFormatError, and input over
    MAX_BLOB_CHARS is refused before any decoding. The message never repeats the input.
    Canonical: every accepted text writes back (`to_text`) to itself, whitespace stripped.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        raw = bytes(text)
        if len(raw) > MAX_BLOB_CHARS:
            raise BlobFormatError(f"longer than {MAX_BLOB_CHARS} bytes")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise BlobFormatError("not ASCII text") from None
    elif not isinstance(text, str):
        raise BlobFormatError(f"expected str or bytes, not {type(text).__name__}")
    if len(text) > MAX_BLOB_CHARS:
        raise BlobFormatError(f"longer than {MAX_BLOB_CHARS} characters")
    text = text.strip(_WHITESPACE)
    if not text:
        raise BlobFormatError("empty")
    if not text.isascii():
        raise BlobFormatError("not ASCII text")

    head, sep, encoded = text.partition(":")
    if sep and head.startswith(PREFIX):
        version = _version(head[len(PREFIX) :])
        return _decode_body(version, _unbase64(encoded))
    if sep:
        raise BlobFormatError(f"unknown prefix (kmskeys blobs start with '{PREFIX}{VERSION}:')")
    if not allow_legacy:
        raise BlobFormatError(
            f"not a kmskeys blob (no '{PREFIX}{VERSION}:' prefix); raw base64 legacy blobs are "
            "accepted only where legacy blobs are allowed"
        )
    return _decode_legacy(text)


def envelope_aad(blob: Blob, context: Mapping[str, str]) -> bytes:
    """The AES-GCM associated data of an envelope blob opened under `context`.

    `context` is `blob.encryption_context(name, user, unit)`: the seal binds the same name,
    user, unit and metadata as the KMS data key, plus the blob's flags and key ARN.
    """
    if blob.mode != MODE_ENVELOPE or blob.key_arn is None:
        raise BlobFormatError("associated data exists only for envelope blobs")
    flags = _flags(blob)
    arn = blob.key_arn.encode("ascii")
    items = sorted(context.items())
    if len(items) > 255:
        raise BlobFormatError("encryption context has too many entries")
    parts = [_AAD_MAGIC, struct.pack(">BBH", _AAD_VERSION, flags, len(arn)), arn]
    parts.append(struct.pack(">B", len(items)))
    for key, value in items:
        k, v = key.encode("utf-8"), value.encode("utf-8")
        if len(k) > 255 or len(v) > 0xFFFF:
            raise BlobFormatError("encryption context entry too long")
        parts += [struct.pack(">B", len(k)), k, struct.pack(">H", len(v)), v]
    return b"".join(parts)


def _check(blob: Blob) -> None:
    """Every invariant of a Blob; one place, used by parsing and by the encryptor alike."""
    if blob.mode == MODE_LEGACY:
        if blob.version or blob.key_arn is not None or blob.metadata or _flags(blob):
            raise BlobFormatError("a legacy blob has version 0 and no ARN, bindings or metadata")
        if blob.nonce is not None or blob.sealed is not None:
            raise BlobFormatError("a legacy blob has no envelope")
        if blob.name is not None or blob.user is not None or blob.unit is not None:
            raise BlobFormatError("a legacy blob records no name, user or unit")
        _check_ciphertext(blob.ciphertext)
        return
    if blob.mode not in _MODE_CODES:
        raise BlobFormatError("mode must be 'direct', 'envelope' or 'legacy'")
    if blob.version not in VERSIONS:
        raise BlobFormatError(f"unsupported blob version {blob.version}")
    if type(blob.binds_user) is not bool or type(blob.binds_unit) is not bool:
        raise BlobFormatError("binds_user and binds_unit must be bools")
    check_recorded(
        blob.version, (blob.name, blob.user, blob.unit), (blob.binds_user, blob.binds_unit)
    )
    arn = blob.key_arn
    if (
        not isinstance(arn, str)
        or not 0 < len(arn) <= MAX_KEY_ARN
        or not arn.isascii()
        or not arn.isprintable()
        or " " in arn
    ):
        raise BlobFormatError(f"key ARN must be 1 to {MAX_KEY_ARN} printable ASCII characters")
    if not isinstance(blob.metadata, Mapping) or len(blob.metadata) > MAX_METADATA:
        raise BlobFormatError(f"at most {MAX_METADATA} metadata entries")
    for key, value in blob.metadata.items():
        check_context_key(key)
        check_context_value(value)
        if key == CONTEXT_NOT_AFTER:
            parse_not_after(value)
    _check_ciphertext(blob.ciphertext)
    if blob.mode == MODE_DIRECT:
        if blob.nonce is not None or blob.sealed is not None:
            raise BlobFormatError("a direct blob has no nonce or sealed part")
        return
    if not isinstance(blob.nonce, bytes) or len(blob.nonce) != NONCE_BYTES:
        raise BlobFormatError(f"an envelope nonce is {NONCE_BYTES} bytes")
    if not isinstance(blob.sealed, bytes) or not TAG_BYTES < len(blob.sealed) <= MAX_SEALED:
        raise BlobFormatError(f"an envelope's sealed part is {TAG_BYTES + 1} to {MAX_SEALED} bytes")


def _check_ciphertext(ciphertext: bytes) -> None:
    if not isinstance(ciphertext, bytes) or not 0 < len(ciphertext) <= MAX_KMS_CIPHERTEXT:
        raise BlobFormatError(f"KMS ciphertext must be 1 to {MAX_KMS_CIPHERTEXT} bytes")


def _flags(blob: Blob) -> int:
    return _FLAG_BINDS_USER * blob.binds_user | _FLAG_BINDS_UNIT * blob.binds_unit


def _text(version: int, body: bytes) -> str:
    return f"{PREFIX}{version}:" + base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")


def _encode_body(blob: Blob, version: int) -> bytes:
    # The body, big-endian (docs/blob-format.md):
    #   u8 mode | u8 flags | v2 only: u8 name_len name [u8 user_len user, if binds user]
    #   [u8 unit_len unit, if binds unit] | u16 arn_len arn | u8 count (u8 klen key u16 vlen
    #   value)* | u16 ct_len ct | envelope only: nonce[12] sealed[rest]
    assert blob.key_arn is not None
    parts = [struct.pack(">BB", _MODE_CODES[blob.mode], _flags(blob))]
    if version >= 2:
        for value in (blob.name, blob.user, blob.unit):
            if value is not None:
                parts += [struct.pack(">B", len(value)), value.encode("ascii")]
    arn = blob.key_arn.encode("ascii")
    parts += [struct.pack(">H", len(arn)), arn, struct.pack(">B", len(blob.metadata))]
    for key, value in blob.metadata.items():  # already sorted by key
        k, v = key.encode("ascii"), value.encode("utf-8")
        parts += [struct.pack(">B", len(k)), k, struct.pack(">H", len(v)), v]
    parts += [struct.pack(">H", len(blob.ciphertext)), blob.ciphertext]
    if blob.mode == MODE_ENVELOPE:
        assert blob.nonce is not None and blob.sealed is not None
        parts += [blob.nonce, blob.sealed]
    return b"".join(parts)


class _Reader:
    """Bounds-checked reads from the decoded body; running short is a format error."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise BlobFormatError(f"truncated {what}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = struct.unpack(">H", self.take(2, what))[0]
        return value

    def ascii(self, length: int, what: str) -> str:
        try:
            return self.take(length, what).decode("ascii")
        except UnicodeDecodeError:
            raise BlobFormatError(f"{what} is not ASCII") from None

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk


def _version(digits: str) -> int:
    """The version of a `kmskN:` prefix: one spelling each, so `kmsk01:` is refused."""
    if not digits or not _DIGITS.issuperset(digits) or len(digits) > 4:
        raise BlobFormatError("malformed version prefix")
    version = int(digits)
    if digits != str(version):
        # A second spelling would be a second host-cache entry (and Decrypt) for one blob.
        raise BlobFormatError(
            f"non-canonical version prefix (leading zeros): write {PREFIX}{version}:"
        )
    if version not in VERSIONS:
        raise BlobFormatError(
            f"unsupported blob version {version} (this kmskeys reads versions "
            f"{', '.join(map(str, VERSIONS))})"
        )
    return version


def _unbase64(encoded: str) -> bytes:
    if not encoded:
        raise BlobFormatError("no body after the prefix")
    if not _URLSAFE.issuperset(encoded):
        raise BlobFormatError("body is not unpadded base64url")
    if len(encoded) % 4 == 1:
        raise BlobFormatError("body has an impossible base64 length")
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        body = base64.b64decode(padded.translate(_TO_STANDARD), validate=True)
    except (binascii.Error, ValueError):
        raise BlobFormatError("body is not valid base64url") from None
    # One text per blob: reject non-zero padding bits so to_text(parse(x)) == x.
    if base64.urlsafe_b64encode(body).decode("ascii").rstrip("=") != encoded:
        raise BlobFormatError("body is not canonical base64url")
    return body


def _decode_body(version: int, body: bytes) -> Blob:
    r = _Reader(body)
    mode = _CODE_MODES.get(r.u8("mode"))
    if mode is None:
        raise BlobFormatError("unknown mode")
    flags = r.u8("flags")
    if flags & ~_KNOWN_FLAGS:
        raise BlobFormatError("unknown flags set")
    binds_user = bool(flags & _FLAG_BINDS_USER)
    binds_unit = bool(flags & _FLAG_BINDS_UNIT)
    name = user = unit = None
    if version >= 2:
        name = r.ascii(r.u8("recorded name length"), "recorded name")
        if binds_user:
            user = r.ascii(r.u8("recorded user length"), "recorded user")
        if binds_unit:
            unit = r.ascii(r.u8("recorded unit length"), "recorded unit")
    arn = r.ascii(r.u16("key ARN length"), "key ARN")
    metadata = _decode_metadata(r)
    ciphertext = r.take(r.u16("ciphertext length"), "ciphertext")
    nonce = sealed = None
    if mode == MODE_ENVELOPE:
        nonce = r.take(NONCE_BYTES, "envelope nonce")
        sealed = r.rest()
    elif r.rest():
        raise BlobFormatError("trailing bytes after the ciphertext")
    return Blob(
        version=version,
        mode=mode,
        key_arn=arn,
        binds_user=binds_user,
        metadata=metadata,
        ciphertext=ciphertext,
        nonce=nonce,
        sealed=sealed,
        name=name,
        user=user,
        binds_unit=binds_unit,
        unit=unit,
    )


def _decode_metadata(r: _Reader) -> dict[str, str]:
    count = r.u8("metadata count")
    if count > MAX_METADATA:
        raise BlobFormatError(f"more than {MAX_METADATA} metadata entries")
    metadata: dict[str, str] = {}
    previous = ""
    for _ in range(count):
        key_bytes = r.take(r.u8("metadata key length"), "metadata key")
        value_bytes = r.take(r.u16("metadata value length"), "metadata value")
        try:
            key = key_bytes.decode("ascii")
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise BlobFormatError("metadata is not valid text") from None
        if key in (CONTEXT_NAME, CONTEXT_USER, CONTEXT_UNIT):
            # The request supplies these; a blob that carries them is forged or broken.
            raise BlobFormatError(f"blob carries the request-bound context key {key!r}")
        if metadata and key <= previous:
            raise BlobFormatError("metadata keys are not in strictly ascending order")
        previous = key
        metadata[key] = value
    return metadata


def _decode_legacy(text: str) -> Blob:
    if not _STANDARD.issuperset(text) or len(text) % 4:
        raise BlobFormatError("legacy blob is not standard padded base64")
    try:
        ciphertext = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BlobFormatError("legacy blob is not valid base64") from None
    if base64.b64encode(ciphertext).decode("ascii") != text:
        raise BlobFormatError("legacy blob is not canonical base64")
    return Blob(version=0, mode=MODE_LEGACY, key_arn=None, binds_user=False, ciphertext=ciphertext)


_TO_STANDARD = str.maketrans("-_", "+/")

__all__ = [
    "CONTEXT_NAME",
    "CONTEXT_NOT_AFTER",
    "CONTEXT_UNIT",
    "CONTEXT_USER",
    "MAX_BLOB_CHARS",
    "MAX_CONTEXT_KEY",
    "MAX_CONTEXT_VALUE",
    "MODE_DIRECT",
    "MODE_ENVELOPE",
    "MODE_LEGACY",
    "RESERVED_CONTEXT_PREFIX",
    "VERSION",
    "VERSIONS",
    "Blob",
    "BlobFormatError",
    "BlobMismatchError",
    "check_context_key",
    "check_context_value",
    "envelope_aad",
    "format_not_after",
    "parse_blob",
    "parse_not_after",
]
