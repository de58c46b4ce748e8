"""Token-protected blobs and seals: a secret under a key that never leaves a PKCS#11 token.

One format for the two uses of issue 25 (docs/blob-format.md, "Token blobs"):

- a **blob** `kmsp2:<base64url>`, written at build time with the token's public key alone
  (`kmskeys encrypt --to pkcs11:...`) and opened on the host by the token (`token:NAME`, from
  blob_dir/NAME.kmsp);
- a **sealed keystore key** (`seal = "pkcs11"`), the same envelope bound to the seal context.

The envelope: a random 32-byte data key, wrapped by RSA-OAEP (MGF1 and hash SHA-1, no label)
under the token's RSA public key; the secret under AES-256-GCM with that data key. RSA-OAEP with
SHA-1 is the one variant that SoftHSM 2.6 (it refuses any other hash), YubiKey PIV through ykcs11
(RSA keys only, no AES, no derive) and smart cards all decrypt; SHA-1's collisions do not touch
OAEP. The name, the user and the metadata are bound exactly as KMS encryption context binds a
`kms:` blob: they come from the request, never from the blob, and they are the AES-GCM
associated data, so a blob presented under another name or by another user does not open. As a
`kmsk2:` blob does, a `kmsp2:` blob also records the name (and user) it was made for, so that a
blob deployed under another name is refused locally, with both names, before the token is asked:
a check, never the binding.

Version 1 (`kmsp1:`, issue 25's first phase) recorded no name; it never left a release, and is
refused with a message that says to encrypt again.

Stdlib only at import; `cryptography` is imported inside the sealing functions.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from kmskeys.blob import (
    CONTEXT_NAME,
    CONTEXT_USER,
    MAX_CONTEXT_VALUE,
    MAX_METADATA,
    NONCE_BYTES,
    TAG_BYTES,
    BlobFormatError,
    check_context_key,
    check_context_value,
)
from kmskeys.blobfields import BlobMismatchError, check_recorded_name, check_user_name
from kmskeys.contract import USER_PAYLOAD_MAX

PREFIX = "kmsp"
VERSION = 2
TEXT_PREFIX = f"{PREFIX}{VERSION}:"
RETIRED_PREFIXES = (f"{PREFIX}1:",)
# A token blob deployed for NAME lives at blob_dir/NAME + BLOB_SUFFIX (`token:NAME`).
BLOB_SUFFIX = ".kmsp"
# The associated data's own layout version, not the blob's (kept when the text format moves).
AAD_VERSION = 1
ALG_RSA_OAEP_SHA1_AES256GCM = 1
ALGORITHMS = {ALG_RSA_OAEP_SHA1_AES256GCM: "RSA-OAEP-SHA1+AES-256-GCM"}
KEY_ID_BYTES = 32  # SHA-256 of the token key's SubjectPublicKeyInfo (DER)
DATA_KEY_BYTES = 32
MIN_WRAPPED, MAX_WRAPPED = 256, 512  # RSA 2048..4096: the wrapped key is one modulus long
MAX_SEALED = USER_PAYLOAD_MAX + TAG_BYTES
MAX_BLOB_CHARS = 64 * 1024
PURPOSE_BLOB = b"kmsp-blob-aad"
PURPOSE_SEAL = b"kmsp-seal-aad"
_FLAG_BINDS_USER = 0x01


class TokenEnvelope:
    """A data key wrapped by a token key, and what the data key sealed."""

    __slots__ = ("alg", "key_id", "nonce", "sealed", "wrapped")

    def __init__(self, alg: int, key_id: bytes, wrapped: bytes, nonce: bytes, sealed: bytes):
        if alg not in ALGORITHMS:
            raise BlobFormatError(f"unknown token algorithm {alg}")
        if len(key_id) != KEY_ID_BYTES:
            raise BlobFormatError(f"a token key id is {KEY_ID_BYTES} bytes")
        if not MIN_WRAPPED <= len(wrapped) <= MAX_WRAPPED:
            raise BlobFormatError(f"a wrapped key is {MIN_WRAPPED}..{MAX_WRAPPED} bytes")
        if len(nonce) != NONCE_BYTES or not TAG_BYTES < len(sealed) <= MAX_SEALED:
            raise BlobFormatError("the sealed part has the wrong shape")
        self.alg, self.key_id, self.wrapped = alg, key_id, wrapped
        self.nonce, self.sealed = nonce, sealed

    def to_bytes(self) -> bytes:
        """u8 alg | key id | u16 length + wrapped key | nonce | sealed (the keystore material)."""
        head = struct.pack(">B", self.alg) + self.key_id + struct.pack(">H", len(self.wrapped))
        return head + self.wrapped + self.nonce + self.sealed

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenEnvelope:
        """Parse what `to_bytes` wrote; BlobFormatError if it is anything else."""
        reader = _Reader(data)
        return _read_envelope(reader)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenEnvelope) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    def __repr__(self) -> str:
        return (
            f"TokenEnvelope({ALGORITHMS[self.alg]}, key_id={self.key_id.hex()[:16]}..., "
            f"wrapped=<{len(self.wrapped)} bytes>, sealed=<{len(self.sealed)} bytes>)"
        )


@dataclass(frozen=True)
class TokenBlob:
    """A parsed `kmsp2:` blob; `parse_token_blob` reads one, `to_text` writes one.

    `name` (and `user`, exactly when it binds one) are what it was made for: not secret, and
    not the binding (that is the request's name and user, in the associated data)."""

    envelope: TokenEnvelope
    name: str
    user: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def binds_user(self) -> bool:
        """Whether only requests by `user` open it."""
        return self.user is not None

    def __post_init__(self) -> None:
        check_recorded_name(self.name)
        if self.user is not None:
            check_user_name(self.user)
        if len(self.metadata) > MAX_METADATA:
            raise BlobFormatError(f"more than {MAX_METADATA} metadata entries")
        for key, value in self.metadata.items():
            check_context_key(key)
            check_context_value(value)
        ordered = dict(sorted(self.metadata.items()))
        object.__setattr__(self, "metadata", types.MappingProxyType(ordered))

    def check_request(self, name: str | None, user: str | None) -> None:
        """Raise BlobMismatchError if this blob records another name than `name`, or another
        user than `user` (each when given): what the token would refuse, found without it."""
        if name is not None and name != self.name:
            raise BlobMismatchError(f"blob was encrypted for {self.name!r}, not {name!r}")
        if self.user is not None and user is not None and user != self.user:
            raise BlobMismatchError(f"blob was encrypted for user {self.user!r}, not {user!r}")

    def encryption_context(self, name: str, user: str | None) -> dict[str, str]:
        """The bound context for a request for `name` by `user` (both from the request)."""
        if not isinstance(name, str) or not name:
            raise BlobFormatError("the request supplied no secret name")
        self.check_request(name, user)
        context = {CONTEXT_NAME: name}
        if self.binds_user:
            if not isinstance(user, str) or not user:
                raise BlobFormatError("blob is bound to a user but the request supplied none")
            context[CONTEXT_USER] = user
        context.update(self.metadata)
        return context

    def aad(self, context: Mapping[str, str]) -> bytes:
        """The AES-GCM associated data of this blob opened under `context`."""
        envelope = self.envelope
        return associated_data(PURPOSE_BLOB, envelope.alg, envelope.key_id, context, _flags(self))

    def to_text(self) -> str:
        """`kmsp2:` + base64url (no padding) of the body."""
        body = bytearray(struct.pack(">BB", self.envelope.alg, _flags(self)))
        for value in (self.name,) if self.user is None else (self.name, self.user):
            body += struct.pack(">B", len(value)) + value.encode("ascii")
        body += self.envelope.key_id
        body += struct.pack(">B", len(self.metadata))
        for key, value in self.metadata.items():
            k, v = key.encode("ascii"), value.encode("utf-8")
            body += struct.pack(">B", len(k)) + k + struct.pack(">H", len(v)) + v
        body += struct.pack(">H", len(self.envelope.wrapped)) + self.envelope.wrapped
        body += self.envelope.nonce + self.envelope.sealed
        return TEXT_PREFIX + base64.urlsafe_b64encode(bytes(body)).decode("ascii").rstrip("=")


def _flags(blob: TokenBlob) -> int:
    return _FLAG_BINDS_USER if blob.binds_user else 0


def is_token_blob(text: str | bytes) -> bool:
    """Whether `text` claims to be a token blob (its prefix; parse it to know more)."""
    head = text[: len(TEXT_PREFIX) + 8]
    stripped = head.decode("ascii", "replace") if isinstance(head, bytes) else head
    return stripped.lstrip(" \t\r\n").startswith(TEXT_PREFIX)


def parse_token_blob(text: str | bytes) -> TokenBlob:
    """Parse a `kmsp2:` blob or raise BlobFormatError (never repeating the input)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise BlobFormatError("not ASCII text") from None
    if len(text) > MAX_BLOB_CHARS:
        raise BlobFormatError(f"longer than {MAX_BLOB_CHARS} characters")
    text = text.strip(" \t\r\n")
    if text.startswith(RETIRED_PREFIXES):
        raise BlobFormatError(
            f"a {text[:6]} token blob records no name (a format before any release): encrypt "
            f"the secret again (kmskeys encrypt --to ...), which writes {TEXT_PREFIX}"
        )
    if not text.startswith(TEXT_PREFIX):
        raise BlobFormatError(f"a token blob starts with {TEXT_PREFIX!r}")
    encoded = text[len(TEXT_PREFIX) :]
    try:
        body = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise BlobFormatError("body is not valid base64url") from None
    if base64.urlsafe_b64encode(body).decode("ascii").rstrip("=") != encoded:
        raise BlobFormatError("body is not canonical base64url")
    reader = _Reader(body)
    alg, flags = reader.u8("algorithm"), reader.u8("flags")
    if flags & ~_FLAG_BINDS_USER:
        raise BlobFormatError("unknown flags set")
    name = reader.text(reader.u8("name length"), "name")
    user = reader.text(reader.u8("user length"), "user") if flags & _FLAG_BINDS_USER else None
    key_id = reader.take(KEY_ID_BYTES, "key id")
    metadata = _read_metadata(reader)
    wrapped = reader.take(reader.u16("wrapped key length"), "wrapped key")
    nonce = reader.take(NONCE_BYTES, "nonce")
    envelope = TokenEnvelope(alg, key_id, wrapped, nonce, reader.rest())
    return TokenBlob(envelope, name, user, metadata=metadata)


def associated_data(
    purpose: bytes, alg: int, kid: bytes, context: Mapping[str, str], flags: int = 0
) -> bytes:
    """purpose | u8 version | u8 alg | u8 flags | key id | u8 n | n x (u8 klen k u16 vlen v)."""
    items = sorted(context.items())
    if len(items) > 255:
        raise BlobFormatError("context has too many entries")
    parts = [purpose, struct.pack(">BBB", AAD_VERSION, alg, flags), kid]
    parts.append(struct.pack(">B", len(items)))
    for key, value in items:
        k, v = key.encode("utf-8"), value.encode("utf-8")
        if len(k) > 255 or len(v) > 0xFFFF:
            raise BlobFormatError("context entry too long")
        parts += [struct.pack(">B", len(k)), k, struct.pack(">H", len(v)), v]
    return b"".join(parts)


def key_id(spki_der: bytes) -> bytes:
    """The id of a token key: SHA-256 of its public half's SubjectPublicKeyInfo (DER)."""
    return hashlib.sha256(spki_der).digest()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise BlobFormatError(f"truncated ({what})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        value: int = self.take(1, what)[0]
        return value

    def u16(self, what: str) -> int:
        value: int = struct.unpack(">H", self.take(2, what))[0]
        return value

    def text(self, n: int, what: str) -> str:
        try:
            return self.take(n, what).decode("ascii")
        except UnicodeDecodeError:
            raise BlobFormatError(f"the recorded {what} is not ASCII") from None

    def rest(self) -> bytes:
        chunk, self.pos = self.data[self.pos :], len(self.data)
        return chunk


def _read_envelope(reader: _Reader) -> TokenEnvelope:
    alg = reader.u8("algorithm")
    kid = reader.take(KEY_ID_BYTES, "key id")
    wrapped = reader.take(reader.u16("wrapped key length"), "wrapped key")
    nonce = reader.take(NONCE_BYTES, "nonce")
    return TokenEnvelope(alg, kid, wrapped, nonce, reader.rest())


def _read_metadata(reader: _Reader) -> dict[str, str]:
    count = reader.u8("metadata count")
    if count > MAX_METADATA:
        raise BlobFormatError(f"more than {MAX_METADATA} metadata entries")
    metadata: dict[str, str] = {}
    for _ in range(count):
        key_bytes = reader.take(reader.u8("metadata key length"), "metadata key")
        value_bytes = reader.take(reader.u16("metadata value length"), "metadata value")
        if len(value_bytes) > MAX_CONTEXT_VALUE * 4:
            raise BlobFormatError("metadata value too long")
        try:
            key, value = key_bytes.decode("ascii"), value_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise BlobFormatError("metadata is not valid text") from None
        if key in (CONTEXT_NAME, CONTEXT_USER):
            raise BlobFormatError(f"blob carries the request-bound context key {key!r}")
        if metadata and key <= list(metadata)[-1]:
            raise BlobFormatError("metadata keys are not in strictly ascending order")
        metadata[key] = value
    return metadata


# --- the software half: sealing with the public key, opening with an unwrapped data key -------


def wrap_data_key(spki_der: bytes) -> tuple[bytes, bytes]:
    """(data key, the data key wrapped by RSA-OAEP-SHA1 under the RSA public key `spki_der`)."""
    import os

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    public = serialization.load_der_public_key(spki_der)
    if not isinstance(public, rsa.RSAPublicKey) or not 2048 <= public.key_size <= 4096:
        raise BlobFormatError("a token key is an RSA key of 2048 to 4096 bits")
    data_key = os.urandom(DATA_KEY_BYTES)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
    return data_key, public.encrypt(data_key, oaep)


def seal_with(data_key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """(nonce, AES-256-GCM ciphertext and tag) of `plaintext` under `data_key`."""
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not 0 < len(plaintext) <= USER_PAYLOAD_MAX:
        raise BlobFormatError(f"a sealed secret is 1..{USER_PAYLOAD_MAX} bytes")
    # A random 96-bit nonce is safe: each data key seals exactly one message.
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(data_key).encrypt(nonce, plaintext, aad)


def open_with(envelope: TokenEnvelope, data_key: bytes, aad: bytes) -> bytes:
    """The plaintext of `envelope` under its unwrapped data key, or BlobFormatError."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(data_key) != DATA_KEY_BYTES:
        raise BlobFormatError("the unwrapped data key has the wrong length")
    try:
        return AESGCM(data_key).decrypt(envelope.nonce, envelope.sealed, aad)
    except InvalidTag:
        raise BlobFormatError(
            "the sealed part does not authenticate: another name, user, context or key"
        ) from None


def seal_blob(
    spki_der: bytes,
    plaintext: bytes,
    name: str,
    *,
    user: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> TokenBlob:
    """A `kmsp2:` blob of `plaintext` for `name` (and `user`), openable by the token alone."""
    from kmskeys.names import validate_name

    meta = dict(metadata or {})
    draft_context = {CONTEXT_NAME: validate_name(name), **meta}
    if user is not None:
        draft_context[CONTEXT_USER] = check_user_name(user)
    kid = key_id(spki_der)
    data_key, wrapped = wrap_data_key(spki_der)
    flags = _FLAG_BINDS_USER if user is not None else 0
    aad = associated_data(PURPOSE_BLOB, ALG_RSA_OAEP_SHA1_AES256GCM, kid, draft_context, flags)
    nonce, sealed = seal_with(data_key, plaintext, aad)
    envelope = TokenEnvelope(ALG_RSA_OAEP_SHA1_AES256GCM, kid, wrapped, nonce, sealed)
    return TokenBlob(envelope, name, user, metadata=meta)


def open_blob(blob: TokenBlob, data_key: bytes, name: str, user: str | None) -> bytes:
    """The secret of `blob` requested as `name` by `user` (from the request), or raise."""
    return open_with(blob.envelope, data_key, blob.aad(blob.encryption_context(name, user)))


def seal_entry(spki_der: bytes, key: bytes, context: Mapping[str, str]) -> TokenEnvelope:
    """A keystore key sealed under the token key, bound to `context` (the seal context)."""
    kid = key_id(spki_der)
    data_key, wrapped = wrap_data_key(spki_der)
    aad = associated_data(PURPOSE_SEAL, ALG_RSA_OAEP_SHA1_AES256GCM, kid, context)
    nonce, sealed = seal_with(data_key, key, aad)
    return TokenEnvelope(ALG_RSA_OAEP_SHA1_AES256GCM, kid, wrapped, nonce, sealed)


def open_entry(envelope: TokenEnvelope, data_key: bytes, context: Mapping[str, str]) -> bytes:
    """The keystore key inside a sealed envelope, if `context` is the one it was sealed with."""
    aad = associated_data(PURPOSE_SEAL, envelope.alg, envelope.key_id, context)
    return open_with(envelope, data_key, aad)


__all__ = [
    "ALG_RSA_OAEP_SHA1_AES256GCM",
    "BLOB_SUFFIX",
    "TEXT_PREFIX",
    "TokenBlob",
    "TokenEnvelope",
    "associated_data",
    "is_token_blob",
    "key_id",
    "open_blob",
    "open_entry",
    "parse_token_blob",
    "seal_blob",
    "seal_entry",
    "wrap_data_key",
]
