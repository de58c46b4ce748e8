"""DPAPI for Linux: protect data under a master key that the host keeps (docs/dpapi.md).

`protect` and `unprotect` mirror CryptProtectData / CryptUnprotectData. The master key is the
`stored:` key of (scope, NAME), fetched through the kernel keyring: the first request has the root
resolver create and keep it, every later one is a cache hit. User scope (the default) gives each
uid its own master key, machine scope one per host, as the resolver's policy allows.

Each blob gets its own AES-256-GCM key, derived with HKDF-SHA256 from the master key, a random
salt, the blob's whole header and a hash of the optional entropy; chunks follow the STREAM
construction (kmskeys.protectblob), so truncation and reordering are detected. `cryptography` is
imported inside the functions: `import kmskeys` never loads it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from kmskeys.contract import DEFAULT_STORED_PREFIX
from kmskeys.errors import (
    KeyNotFoundError,
    KeyPermissionError,
    KeyRejectedError,
    ProtectAuthenticationError,
    ScopeNotAllowedError,
    TruncatedProtectBlobError,
    UnknownKeyVersionError,
    WrongUserError,
)
from kmskeys.key import Key
from kmskeys.protectblob import (
    DEFAULT_CHUNK,
    MAGIC,
    NONCE_PREFIX_BYTES,
    SALT_BYTES,
    TAG_BYTES,
    TEXT_PREFIX,
    ProtectHeader,
    chunk_nonce,
    from_text,
    read_header,
    to_text,
)
from kmskeys.stored import SCOPE_MACHINE, SCOPE_USER, SCOPES, StoredQuery, stored_description

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

DEFAULT_NAME = "default"
MASTER_KEY_BYTES = 32
# The callout of every master-key request: its size. The resolver refuses a stored key of any
# other size rather than recreate it.
_MASTER_KEY_CALLOUT = str(MASTER_KEY_BYTES).encode()
_HKDF_INFO = b"kmskeys dpapi v1\x00"


class Reader(Protocol):
    """What protect and unprotect read from: a binary file object."""

    def readinto(self, buffer: bytearray | memoryview, /) -> int | None: ...

    def read(self, size: int = -1, /) -> bytes: ...


class Writer(Protocol):
    """What they write to."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...


# --- the master key, through the kernel ---------------------------------------------------------


def fsuid() -> int:
    """The caller's filesystem uid: the uid the kernel gives its keys and passes as %u."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"Uid:"):
                return int(line.split()[4])  # real, effective, saved, filesystem
    raise RuntimeError("/proc/self/status has no Uid line")


def _read_owned(desc: str) -> bytes:
    key = Key.request(desc, _MASTER_KEY_CALLOUT)
    # A keyring shared with another uid may hold a key that uid planted under this description:
    # only a key the resolver made for us (owned by our fsuid) is our master key.
    info = key.describe()
    me = fsuid()
    if info.type != "user" or info.uid != me:
        raise KeyPermissionError(
            f"{desc}: the key found is owned by uid {info.uid}, not by you (uid {me}); start a "
            "fresh session keyring (keyctl session -) or use KeyringMode=private"
        )
    return key.read()


def _diagnose(prefix: str, name: str, scope: str, refused: KeyRejectedError) -> Exception:
    """Why the resolver refused a master key: a scope the policy does not give, or `refused`."""
    try:
        policy = _read_owned(stored_description(prefix, name, StoredQuery(StoredQuery.SCOPE)))
    except KeyRejectedError:
        return refused
    held = policy.decode("ascii", "replace")
    if held in SCOPES and held != scope:
        return ScopeNotAllowedError(
            f"scope not allowed by policy: {name!r} is {held}-scoped on this host, not {scope}; "
            f"protect it with scope={held!r}, or have the admin add "
            f'[stored."{name}"] scope = "{scope}" to the resolver config'
        )
    return refused


def latest_version(name: str, scope: str, prefix: str = DEFAULT_STORED_PREFIX) -> int:
    """The newest master-key version of (scope, NAME); the resolver creates version 1 if none."""
    desc = stored_description(prefix, name, StoredQuery(StoredQuery.LATEST, scope))
    try:
        raw = _read_owned(desc)
    except KeyRejectedError as exc:
        raise _diagnose(prefix, name, scope, exc) from None
    if not raw.isdigit():
        raise KeyRejectedError(f"{desc}: the resolver's answer is not a version number")
    return int(raw)


def master_key(name: str, scope: str, version: int, prefix: str = DEFAULT_STORED_PREFIX) -> bytes:
    """Version `version` of the master key of (scope, NAME), from the kernel cache or resolver."""
    desc = stored_description(prefix, name, StoredQuery(StoredQuery.KEY, scope, version))
    try:
        key = _read_owned(desc)
    except KeyNotFoundError:
        raise UnknownKeyVersionError(
            f"{desc}: this host's keystore has no version {version} of the {scope}-scope key "
            f"{name!r}; unprotect on the host that protected the data, or restore its keystore "
            "(kmskeys-resolver stored list shows the versions kept)"
        ) from None
    except KeyRejectedError as exc:
        raise _diagnose(prefix, name, scope, exc) from None
    if len(key) != MASTER_KEY_BYTES:
        raise KeyRejectedError(f"{desc}: the master key is {len(key)} bytes, not 32")
    return key


# --- one blob's key -----------------------------------------------------------------------------


def _blob_cipher(master: bytes, header: bytes, salt: bytes, entropy: bytes) -> AESGCM:
    import hashlib

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    # The header is in the info: change one byte of it (scope, uid, name, version, description,
    # chunk size, nonce prefix) and the key, so every chunk, no longer matches.
    info = _HKDF_INFO + hashlib.sha256(entropy).digest() + header
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(master)
    return AESGCM(derived)


def _fill(src: Reader, buf: bytearray) -> int:
    """Read until `buf` is full or the input ends; the number of bytes read."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = src.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _wipe(*buffers: bytearray) -> None:
    for buf in buffers:
        buf[:] = bytes(len(buf))


# --- streams ------------------------------------------------------------------------------------


def protect_stream(
    src: Reader,
    dst: Writer,
    *,
    name: str = DEFAULT_NAME,
    scope: str = SCOPE_USER,
    entropy: bytes = b"",
    description: str = "",
    prefix: str = DEFAULT_STORED_PREFIX,
    chunk_size: int = DEFAULT_CHUNK,
) -> ProtectHeader:
    """Protect all of `src` into `dst` (header, then chunks); return the header written."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be {SCOPE_USER!r} or {SCOPE_MACHINE!r}, not {scope!r}")
    version = latest_version(name, scope, prefix)
    master = master_key(name, scope, version, prefix)
    header = ProtectHeader(
        scope=scope,
        name=name,
        key_version=version,
        uid=fsuid() if scope == SCOPE_USER else None,
        chunk_size=chunk_size,
        salt=os.urandom(SALT_BYTES),
        nonce_prefix=os.urandom(NONCE_PREFIX_BYTES),
        description=description,
    )
    raw = header.encode()
    aead = _blob_cipher(master, raw, header.salt, entropy)
    dst.write(raw)
    cur, nxt, out = bytearray(chunk_size), bytearray(chunk_size), bytearray(chunk_size + TAG_BYTES)
    try:
        n = _fill(src, cur)
        index = 0
        while True:
            # One chunk of lookahead: the last chunk must be known as such when it is sealed.
            m = _fill(src, nxt) if n == chunk_size else 0
            last = m == 0
            sealed = memoryview(out)[: n + TAG_BYTES]
            nonce = chunk_nonce(header.nonce_prefix, index, last)
            aead.encrypt_into(nonce, memoryview(cur)[:n], None, sealed)
            dst.write(sealed)
            if last:
                return header
            cur, nxt, n, index = nxt, cur, m, index + 1
    finally:
        _wipe(cur, nxt)


def _open_header(src: Reader) -> tuple[Reader, ProtectHeader, bytes]:
    """The binary stream (decoded from the text form if need be), its header and header bytes."""
    head = src.read(len(MAGIC))
    if head[: len(TEXT_PREFIX)] == TEXT_PREFIX.encode():
        src = io.BytesIO(from_text(head + src.read()))
        head = b""
    peeked = io.BytesIO(head)

    def read(size: int) -> bytes:
        return peeked.read(size) or src.read(size)

    header, raw = read_header(read)
    return src, header, raw


def unprotect_stream(
    src: Reader,
    dst: Writer,
    *,
    entropy: bytes = b"",
    prefix: str = DEFAULT_STORED_PREFIX,
    on_header: Callable[[ProtectHeader], None] | None = None,
) -> ProtectHeader:
    """Unprotect `src` (binary or text form) into `dst`; return the authenticated header.

    A chunk reaches `dst` only once it has authenticated. Chunks before the last may reach it
    before a later chunk fails: on any failure this raises, and the caller must drop what was
    written (the CLI truncates a regular file back and exits non-zero).
    """
    src, header, raw = _open_header(src)
    if on_header is not None:
        on_header(header)
    if header.scope == SCOPE_USER:
        me = fsuid()
        if header.uid != me:
            raise WrongUserError(
                f"protected for uid {header.uid}; you are uid {me}: a user-scope blob opens only "
                f"for the user who protected it, so run unprotect as uid {header.uid}"
            )
    master = master_key(header.name, header.scope, header.key_version, prefix)
    aead = _blob_cipher(master, raw, header.salt, entropy)
    segment = header.chunk_size + TAG_BYTES
    cur, nxt, out = bytearray(segment), bytearray(segment), bytearray(header.chunk_size)
    try:
        n = _fill(src, cur)
        index = 0
        while True:
            m = _fill(src, nxt) if n == segment else 0
            last = m == 0
            if n < TAG_BYTES:
                raise TruncatedProtectBlobError(
                    f"the blob ends early, inside chunk {index}; restore it from an intact copy"
                )
            plain = memoryview(out)[: n - TAG_BYTES]
            try:
                aead.decrypt_into(
                    chunk_nonce(header.nonce_prefix, index, last), memoryview(cur)[:n], None, plain
                )
            except Exception as exc:
                _wipe(out)  # decrypt_into leaves unauthenticated bytes behind on failure
                raise _auth_failure(aead, header, bytes(cur[:n]), index=index, last=last) from exc
            dst.write(plain)
            if last:
                return header
            cur, nxt, n, index = nxt, cur, m, index + 1
    finally:
        _wipe(out)


def _auth_failure(
    aead: AESGCM, header: ProtectHeader, sealed: bytes, *, index: int, last: bool
) -> Exception:
    from cryptography.exceptions import InvalidTag

    if last and len(sealed) == header.chunk_size + TAG_BYTES:
        # A full chunk at the end that opens as a middle chunk: the rest was cut off.
        try:
            aead.decrypt(chunk_nonce(header.nonce_prefix, index, False), sealed, None)
        except InvalidTag:
            pass
        else:
            return TruncatedProtectBlobError(
                f"the blob ends early, after chunk {index}: at least one chunk is missing; "
                "restore it from an intact copy"
            )
    return ProtectAuthenticationError(
        f"the blob does not authenticate (chunk {index}): wrong entropy, or the data was changed "
        "or cut short; use the entropy given at protect time, or an intact copy of the blob"
    )


# --- the DPAPI calls ----------------------------------------------------------------------------


def protect(
    data: bytes,
    *,
    name: str = DEFAULT_NAME,
    scope: str = SCOPE_USER,
    entropy: bytes = b"",
    description: str = "",
    prefix: str = DEFAULT_STORED_PREFIX,
) -> str:
    """Protect `data` under the (scope, NAME) master key: a one-line blob (CryptProtectData)."""
    out = io.BytesIO()
    protect_stream(
        io.BytesIO(data),
        out,
        name=name,
        scope=scope,
        entropy=entropy,
        description=description,
        prefix=prefix,
    )
    return to_text(out.getvalue())


def unprotect_with_description(
    blob: str | bytes, *, entropy: bytes = b"", prefix: str = DEFAULT_STORED_PREFIX
) -> tuple[bytes, str]:
    """The data and the authenticated description of `blob` (CryptUnprotectData's ppszDataDescr)."""
    raw = blob.encode("ascii", "replace") if isinstance(blob, str) else bytes(blob)
    out = io.BytesIO()
    header = unprotect_stream(io.BytesIO(raw), out, entropy=entropy, prefix=prefix)
    return out.getvalue(), header.description


def unprotect(
    blob: str | bytes, *, entropy: bytes = b"", prefix: str = DEFAULT_STORED_PREFIX
) -> bytes:
    """The data `protect` protected into `blob`, all or nothing (CryptUnprotectData)."""
    return unprotect_with_description(blob, entropy=entropy, prefix=prefix)[0]


def inspect(blob: str | bytes) -> ProtectHeader:
    """What `blob` says about itself (name, scope, version, uid, description), NOT authenticated."""
    raw = blob.encode("ascii", "replace") if isinstance(blob, str) else bytes(blob)
    return _open_header(io.BytesIO(raw))[1]
