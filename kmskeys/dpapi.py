"""DPAPI for Linux: protect data under a master key that the host keeps (docs/dpapi.md).

`protect` and `unprotect` mirror CryptProtectData / CryptUnprotectData. The master key is the
`stored:` key of (scope, NAME), fetched through the kernel keyring: the first request has the root
resolver create and keep it, every later one is a cache hit. User scope (the default) gives each
uid its own master key, machine scope one per host, as the resolver's policy allows.

Each blob gets its own AES-256-GCM key, derived with HKDF-SHA256 from the master key, a random
salt, the blob's whole header and a hash of the optional entropy (kmskeys.dpapi_key); chunks
follow the STREAM construction (kmskeys.protectblob), so truncation and reordering are detected,
and are cut from memory or a stream by kmskeys.dpapi_chunks. `cryptography` is imported inside
the functions: `import kmskeys` never loads it, and neither does this module.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable

from kmskeys.contract import DEFAULT_STORED_PREFIX
from kmskeys.dpapi_chunks import Chunks, give, pieces, take, unread_bytes, wipe_bytes
from kmskeys.dpapi_key import blob_cipher, fsuid, latest_version, master_key
from kmskeys.errors import (
    ProtectAuthenticationError,
    TruncatedProtectBlobError,
    WrongUserError,
)
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
    parse_header,
    read_header,
    to_text,
)
from kmskeys.stored import SCOPE_MACHINE, SCOPE_USER, SCOPES

TYPE_CHECKING = False  # not `from typing import`: a fresh `kmskeys unprotect` pays for typing
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from kmskeys.dpapi_chunks import Reader, Writer

DEFAULT_NAME = "default"
_TEXT_PREFIX = TEXT_PREFIX.encode()


# --- streams ------------------------------------------------------------------------------------


def _new_header(
    name: str, scope: str, *, entropy: bytes, description: str, prefix: str, chunk_size: int
) -> tuple[ProtectHeader, bytes, AESGCM]:
    if scope not in SCOPES:
        raise ValueError(f"scope must be {SCOPE_USER!r} or {SCOPE_MACHINE!r}, not {scope!r}")
    me = fsuid()
    version = latest_version(name, scope, prefix)
    master = master_key(name, scope, version, prefix)
    random = os.urandom(SALT_BYTES + NONCE_PREFIX_BYTES)
    header = ProtectHeader(
        scope=scope,
        name=name,
        key_version=version,
        uid=me if scope == SCOPE_USER else None,
        chunk_size=chunk_size,
        salt=random[:SALT_BYTES],
        nonce_prefix=random[SALT_BYTES:],
        description=description,
    )
    raw = header.encode()
    return header, raw, blob_cipher(master, raw, header.salt, entropy)


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
    header, raw, aead = _new_header(
        name, scope, entropy=entropy, description=description, prefix=prefix, chunk_size=chunk_size
    )
    dst.write(raw)
    out = take(chunk_size + TAG_BYTES)
    whole = unread_bytes(src) if isinstance(src, io.BytesIO) else None
    if whole is not None and len(whole) <= chunk_size:
        # One chunk in memory (the common case): sealed from where it stands, without the chunk
        # loop's slicing; nothing of ours held plaintext, so there is nothing to wipe.
        try:
            sealed = memoryview(out)[: len(whole) + TAG_BYTES]
            aead.encrypt_into(chunk_nonce(header.nonce_prefix, 0, True), whole, None, sealed)
            dst.write(sealed)
        finally:
            give(out)  # ciphertext
        return header
    chunks = Chunks(src if whole is None else whole, chunk_size, empty_chunk=True)
    try:
        for index, chunk, last in chunks:
            sealed = memoryview(out)[: len(chunk) + TAG_BYTES]
            aead.encrypt_into(chunk_nonce(header.nonce_prefix, index, last), chunk, None, sealed)
            dst.write(sealed)
    finally:
        chunks.release(wipe=True)  # plaintext
        give(out)  # ciphertext
    return header


def _split_blob(blob: bytes | bytearray | memoryview) -> tuple[ProtectHeader, bytes, memoryview]:
    """Header, header bytes and chunks of a whole blob in memory (binary or text form)."""
    if blob[: len(_TEXT_PREFIX)] == _TEXT_PREFIX:
        blob = from_text(bytes(blob))
    header, raw = parse_header(blob)  # the header only: never a copy of the whole blob
    return header, raw, memoryview(blob)[len(raw) :]


def _open_header(src: Reader) -> tuple[ProtectHeader, bytes, Reader | memoryview]:
    """Header, header bytes and the rest of a stream (binary, or text form decoded)."""
    if isinstance(src, io.BytesIO):
        whole = unread_bytes(src)
        if whole is not None:  # in memory already: parsed and sliced where it is
            return _split_blob(whole)
    head = b""
    while len(head) < len(MAGIC) and (more := src.read(len(MAGIC) - len(head))):
        head += more  # a pipe may give fewer bytes than asked
    if head[: len(_TEXT_PREFIX)] == _TEXT_PREFIX:
        return _split_blob(head + src.read())
    peeked = io.BytesIO(head)

    def read(size: int) -> bytes:
        return peeked.read(size) or src.read(size)

    header, raw = read_header(read)
    return header, raw, src


def _key_for(header: ProtectHeader, raw: bytes, entropy: bytes, prefix: str) -> AESGCM:
    """The blob's cipher, once the blob is known to be the caller's to open."""
    scope, name, version, uid, _, salt, _, _ = header
    me = fsuid()
    if scope == SCOPE_USER and uid != me:
        raise WrongUserError(
            f"protected for uid {uid}; you are uid {me}: a user-scope blob opens only "
            f"for the user who protected it, so run unprotect as uid {uid}"
        )
    return blob_cipher(master_key(name, scope, version, prefix), raw, salt, entropy)


def _open_chunk(
    aead: AESGCM,
    header: ProtectHeader,
    sealed: memoryview,
    plain: memoryview,
    *,
    index: int,
    last: bool,
) -> None:
    """Authenticate and decrypt one chunk into `plain`, which is zeroed again if it fails."""
    try:
        aead.decrypt_into(chunk_nonce(header.nonce_prefix, index, last), sealed, None, plain)
    except Exception as exc:
        wipe_bytes(plain, len(plain))  # decrypt_into leaves unauthenticated bytes behind
        raise _auth_failure(aead, header, bytes(sealed), index=index, last=last) from exc


def _open_chunks(
    header: ProtectHeader,
    aead: AESGCM,
    body: Reader | memoryview,
    place: Callable[[int], memoryview],
    done: Callable[[memoryview], object],
) -> None:
    """Authenticate and decrypt every chunk of `body` into `place(n)`, then `done(that view)`."""
    size = header.chunk_size + TAG_BYTES
    # Chunks in memory are sliced with no Chunks at all.
    chunks: Chunks | None = None
    items: Iterable[tuple[int, memoryview, bool]]
    if isinstance(body, memoryview):
        items = pieces(body, size, empty_chunk=False)
    else:
        chunks = items = Chunks(body, size, empty_chunk=False)
    seen = 0
    try:
        for index, sealed, last in items:
            seen += 1
            if len(sealed) < TAG_BYTES:
                raise TruncatedProtectBlobError(
                    f"the blob ends early, inside chunk {index}; restore it from an intact copy"
                )
            plain = place(len(sealed) - TAG_BYTES)
            _open_chunk(aead, header, sealed, plain, index=index, last=last)
            done(plain)
    finally:
        if chunks is not None:
            chunks.release(wipe=False)  # ciphertext
    if not seen:
        raise TruncatedProtectBlobError(
            "the blob ends early, before its first chunk; restore it from an intact copy"
        )


def unprotect_stream(
    src: Reader, dst: Writer, *, entropy: bytes = b"", prefix: str = DEFAULT_STORED_PREFIX
) -> ProtectHeader:
    """Unprotect `src` (binary or text form) into `dst`; return the authenticated header.

    A chunk reaches `dst` only once it has authenticated. Chunks before the last may reach it
    before a later chunk fails: on any failure this raises, and the caller must drop what was
    written (the CLI truncates a regular file back and exits non-zero).
    """
    header, raw, body = _open_header(src)
    aead = _key_for(header, raw, entropy, prefix)
    # Every chunk fits a chunk-size buffer: one serves them all, wiped once at the end.
    size = header.chunk_size
    out = take(size)
    used = 0
    try:
        if isinstance(body, memoryview) and TAG_BYTES <= len(body) <= size + TAG_BYTES:
            # One chunk in memory (any blob up to the chunk size, the common case): opened
            # straight into the buffer, without the chunk loop's slicing and callbacks.
            used = len(body) - TAG_BYTES
            plain = memoryview(out)[:used]
            _open_chunk(aead, header, body, plain, index=0, last=True)
            dst.write(plain)
            return header
        view = memoryview(out)

        def place(n: int) -> memoryview:
            nonlocal used
            used = max(used, n)
            return view[:n]

        _open_chunks(header, aead, body, place, dst.write)
        return header
    finally:
        wipe_bytes(out, used)
        give(out)


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


def protect_bytes(
    data: bytes,
    *,
    name: str = DEFAULT_NAME,
    scope: str = SCOPE_USER,
    entropy: bytes = b"",
    description: str = "",
    prefix: str = DEFAULT_STORED_PREFIX,
) -> bytearray:
    """Protect `data` into the binary blob (DPAPI's DATA_BLOB); `protect` is its text form.

    A bytearray: the chunks are sealed straight into it, so nothing is copied or allocated
    twice (on a VM, a megabyte of fresh memory costs about as much as sealing it).
    """
    chunk_size = DEFAULT_CHUNK
    header, raw, aead = _new_header(
        name, scope, entropy=entropy, description=description, prefix=prefix, chunk_size=chunk_size
    )
    view = memoryview(data)
    chunks = max(1, -(-len(view) // chunk_size))
    blob = bytearray(len(raw) + len(view) + chunks * TAG_BYTES)
    blob[: len(raw)] = raw
    at = len(raw)
    for index, chunk, last in pieces(view, chunk_size, empty_chunk=True):
        end = at + len(chunk) + TAG_BYTES
        nonce = chunk_nonce(header.nonce_prefix, index, last)
        aead.encrypt_into(nonce, chunk, None, memoryview(blob)[at:end])
        at = end
    return blob


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
    return to_text(
        protect_bytes(
            data, name=name, scope=scope, entropy=entropy, description=description, prefix=prefix
        )
    )


def unprotect_with_description(
    blob: str | bytes, *, entropy: bytes = b"", prefix: str = DEFAULT_STORED_PREFIX
) -> tuple[bytes, str]:
    """The data and the authenticated description of `blob` (CryptUnprotectData's ppszDataDescr)."""
    header, raw, body = _split_blob(
        blob.encode("ascii", "replace") if isinstance(blob, str) else blob
    )
    aead = _key_for(header, raw, entropy, prefix)
    if TAG_BYTES <= len(body) <= header.chunk_size + TAG_BYTES:
        # One chunk: decrypt returns the data itself, with no buffer of ours to copy or wipe.
        try:
            return aead.decrypt(chunk_nonce(header.nonce_prefix, 0, True), body, None), (
                header.description
            )
        except Exception as exc:
            raise _auth_failure(aead, header, bytes(body), index=0, last=True) from exc
    # Decrypted into one buffer, handed out only when every chunk is good, then wiped.
    result = bytearray(len(body))
    filled = 0

    def place(n: int) -> memoryview:
        return memoryview(result)[filled : filled + n]

    def done(plain: memoryview) -> None:
        nonlocal filled
        filled += len(plain)

    try:
        _open_chunks(header, aead, body, place, done)
        return bytes(memoryview(result)[:filled]), header.description
    finally:
        wipe_bytes(result, filled)


def unprotect(
    blob: str | bytes, *, entropy: bytes = b"", prefix: str = DEFAULT_STORED_PREFIX
) -> bytes:
    """The data `protect` protected into `blob`, all or nothing (CryptUnprotectData)."""
    return unprotect_with_description(blob, entropy=entropy, prefix=prefix)[0]


def inspect(blob: str | bytes) -> ProtectHeader:
    """What `blob` says about itself (name, scope, version, uid, description), NOT authenticated."""
    return _split_blob(blob.encode("ascii", "replace") if isinstance(blob, str) else blob)[0]
