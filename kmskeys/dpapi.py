"""DPAPI for Linux: protect data under a master key that the host keeps (docs/dpapi.md).

`protect` and `unprotect` mirror CryptProtectData / CryptUnprotectData. The master key is the
`stored:` key of (scope, NAME), fetched through the kernel keyring: the first request has the root
resolver create and keep it, every later one is a cache hit. User scope (the default) gives each
uid its own master key, machine scope one per host, as the resolver's policy allows.

Each blob gets its own AES-256-GCM key, derived with HKDF-SHA256 from the master key, a random
salt, the blob's whole header and a hash of the optional entropy; chunks follow the STREAM
construction (kmskeys.protectblob), so truncation and reordering are detected. `cryptography` is
imported inside the functions: `import kmskeys` never loads it, and neither does this module.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Callable, Iterable, Iterator

from kmskeys import keyutils
from kmskeys.contract import DEFAULT_STORED_PREFIX
from kmskeys.errors import (
    KeyNotFoundError,
    KeyRejectedError,
    ProtectAuthenticationError,
    ScopeNotAllowedError,
    TruncatedProtectBlobError,
    UnknownKeyVersionError,
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
    read_header,
    to_text,
)
from kmskeys.stored import SCOPE_MACHINE, SCOPE_USER, SCOPES, StoredQuery, stored_description

TYPE_CHECKING = False  # not `from typing import`: a fresh `kmskeys unprotect` pays for typing
if TYPE_CHECKING:
    from typing import Protocol

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    class Reader(Protocol):
        """What protect and unprotect read from: a binary file object."""

        def readinto(self, buffer: bytearray | memoryview, /) -> int | None: ...

        def read(self, size: int = -1, /) -> bytes: ...

    class Writer(Protocol):
        """What they write to."""

        def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...


DEFAULT_NAME = "default"
MASTER_KEY_BYTES = 32
# The callout of every master-key request: its size. The resolver refuses a stored key of any
# other size rather than recreate it.
_MASTER_KEY_CALLOUT = str(MASTER_KEY_BYTES).encode()
_HKDF_INFO = b"kmskeys dpapi v1\x00"
_EMPTY_SHA256 = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


# --- the master key, through the kernel ---------------------------------------------------------


# The caller's filesystem uid: the uid the kernel gives its keys, passes as %u and checks
# key permissions with.
fsuid = keyutils.current_fsuid


def _read_owned(desc: str) -> bytes:
    # One C call (kmskeys/_hitpath.c), as get_secret's: a keyring shared with another uid may
    # hold a key that uid planted under this description, so only a key owned by our fsuid is
    # read (KeyOwnershipError otherwise).
    return keyutils.fetch(desc.encode(), _MASTER_KEY_CALLOUT, 0)[1]


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


def master_key(
    name: str,
    scope: str,
    version: int,
    prefix: str = DEFAULT_STORED_PREFIX,
) -> bytes:
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
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if entropy:
        digest = hashes.Hash(hashes.SHA256())
        digest.update(entropy)
        entropy_hash = digest.finalize()
    else:
        entropy_hash = _EMPTY_SHA256
    # The header is in the info: change one byte of it (scope, uid, name, version, description,
    # chunk size, nonce prefix) and the key, so every chunk, no longer matches.
    info = _HKDF_INFO + entropy_hash + header
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(master)
    return AESGCM(derived)


# --- chunks -------------------------------------------------------------------------------------

# Zeros to copy from: bytes(n) per wipe would cost a fresh allocation and its page faults.
_ZEROS = [memoryview(b"")]


def _wipe(buf: bytearray, size: int) -> None:
    """Zero the first `size` bytes of `buf` (plaintext our code held)."""
    if len(_ZEROS[0]) < size:
        _ZEROS[0] = memoryview(bytes(size))
    memoryview(buf)[:size] = _ZEROS[0][:size]


# Stream buffers are reused from call to call (wiped when they held plaintext): a fresh
# megabyte costs its page faults every time.
_POOL: list[bytearray] = []
_POOL_MAX = 6  # two streams' worth: three buffers each
_POOLED_MAX_BYTES = 2 * DEFAULT_CHUNK  # a blob with huge chunks does not pin its buffers


def _take(size: int) -> bytearray:
    for at, buf in enumerate(_POOL):
        if len(buf) == size:
            return _POOL.pop(at)
    return bytearray(size)


def _give(*buffers: bytearray) -> None:
    for buf in buffers:
        if len(_POOL) < _POOL_MAX and len(buf) <= _POOLED_MAX_BYTES:
            _POOL.append(buf)


def _with_last(items: Iterable[memoryview]) -> Iterator[tuple[int, memoryview, bool]]:
    """(index, item, is_last) for each item: one item of lookahead.

    The next item is taken before the current one is handed out, so a source may reuse a
    buffer only every other item (the stream readers alternate between two).
    """
    it = iter(items)
    prev = next(it, None)
    if prev is None:
        return
    index = 0
    for item in it:
        yield index, prev, False
        prev, index = item, index + 1
    yield index, prev, True


def _slices(view: memoryview, size: int, *, empty_chunk: bool) -> Iterator[memoryview]:
    if not view and empty_chunk:
        yield view
    for at in range(0, len(view), size):
        yield view[at : at + size]


class _Chunks:
    """The chunks of `src`, `size` bytes each but the last: slices of bytes in memory (no copy),
    or reads of a stream into two alternating buffers, which `wipe()` zeroes after use.

    `empty_chunk`: an empty input is one empty chunk (plaintext), or no chunk (ciphertext).
    """

    def __init__(self, src: Reader | memoryview, size: int, *, empty_chunk: bool) -> None:
        self.src, self.size, self.empty_chunk = src, size, empty_chunk
        self.buffers: tuple[bytearray, ...] = ()
        self.used = [0, 0]

    def __iter__(self) -> Iterator[memoryview]:
        if isinstance(self.src, memoryview):
            return _slices(self.src, self.size, empty_chunk=self.empty_chunk)
        return self._read(self.src)

    def _read(self, src: Reader) -> Iterator[memoryview]:
        self.buffers = (_take(self.size), _take(self.size))
        for turn in itertools.count():
            view = memoryview(self.buffers[turn % 2])
            got = 0
            while got < self.size:
                n = src.readinto(view[got:])
                if not n:
                    break
                got += n
            self.used[turn % 2] = max(self.used[turn % 2], got)
            if got or (turn == 0 and self.empty_chunk):
                yield view[:got]
            if got < self.size:
                return

    def release(self, *, wipe: bool) -> None:
        """Hand the buffers back, zeroed first when they held plaintext (after the last chunk)."""
        if wipe:
            for buf, n in zip(self.buffers, self.used, strict=False):
                _wipe(buf, n)
        _give(*self.buffers)
        self.buffers = ()


# --- streams ------------------------------------------------------------------------------------


def _new_header(
    name: str, scope: str, *, entropy: bytes, description: str, prefix: str, chunk_size: int
) -> tuple[ProtectHeader, bytes, AESGCM]:
    if scope not in SCOPES:
        raise ValueError(f"scope must be {SCOPE_USER!r} or {SCOPE_MACHINE!r}, not {scope!r}")
    me = fsuid()
    version = latest_version(name, scope, prefix)
    master = master_key(name, scope, version, prefix)
    header = ProtectHeader(
        scope=scope,
        name=name,
        key_version=version,
        uid=me if scope == SCOPE_USER else None,
        chunk_size=chunk_size,
        salt=os.urandom(SALT_BYTES),
        nonce_prefix=os.urandom(NONCE_PREFIX_BYTES),
        description=description,
    )
    raw = header.encode()
    return header, raw, _blob_cipher(master, raw, header.salt, entropy)


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
    out = _take(chunk_size + TAG_BYTES)
    chunks = _Chunks(src, chunk_size, empty_chunk=True)
    try:
        for index, chunk, last in _with_last(chunks):
            sealed = memoryview(out)[: len(chunk) + TAG_BYTES]
            aead.encrypt_into(chunk_nonce(header.nonce_prefix, index, last), chunk, None, sealed)
            dst.write(sealed)
    finally:
        chunks.release(wipe=True)  # plaintext
        _give(out)  # ciphertext
    return header


def _split_blob(blob: bytes | bytearray) -> tuple[ProtectHeader, bytes, memoryview]:
    """Header, header bytes and chunks of a whole blob in memory (binary or text form)."""
    if blob[: len(TEXT_PREFIX)] == TEXT_PREFIX.encode():
        blob = from_text(bytes(blob))
    view = memoryview(blob)
    at = 0

    def read(size: int) -> bytes:  # the header only: never a copy of the whole blob
        nonlocal at
        part = bytes(view[at : at + size])
        at += len(part)
        return part

    header, raw = read_header(read)
    return header, raw, view[len(raw) :]


def _open_header(src: Reader) -> tuple[ProtectHeader, bytes, Reader | memoryview]:
    """Header, header bytes and the rest of a stream (binary, or text form decoded)."""
    head = b""
    while len(head) < len(MAGIC) and (more := src.read(len(MAGIC) - len(head))):
        head += more  # a pipe may give fewer bytes than asked
    if head[: len(TEXT_PREFIX)] == TEXT_PREFIX.encode():
        return _split_blob(head + src.read())
    peeked = io.BytesIO(head)

    def read(size: int) -> bytes:
        return peeked.read(size) or src.read(size)

    header, raw = read_header(read)
    return header, raw, src


def _key_for(header: ProtectHeader, raw: bytes, entropy: bytes, prefix: str) -> AESGCM:
    """The blob's cipher, once the blob is known to be the caller's to open."""
    me = fsuid()
    if header.scope == SCOPE_USER and header.uid != me:
        raise WrongUserError(
            f"protected for uid {header.uid}; you are uid {me}: a user-scope blob opens only "
            f"for the user who protected it, so run unprotect as uid {header.uid}"
        )
    master = master_key(header.name, header.scope, header.key_version, prefix)
    return _blob_cipher(master, raw, header.salt, entropy)


def _open_chunks(
    header: ProtectHeader,
    aead: AESGCM,
    body: Reader | memoryview,
    place: Callable[[int], memoryview],
    done: Callable[[memoryview], object],
) -> None:
    """Authenticate and decrypt every chunk of `body` into `place(n)`, then `done(that view)`."""
    chunks = _Chunks(body, header.chunk_size + TAG_BYTES, empty_chunk=False)
    try:
        _open_each(header, aead, chunks, place, done)
    finally:
        chunks.release(wipe=False)  # ciphertext


def _open_each(
    header: ProtectHeader,
    aead: AESGCM,
    chunks: _Chunks,
    place: Callable[[int], memoryview],
    done: Callable[[memoryview], object],
) -> None:
    seen = 0
    for index, sealed, last in _with_last(chunks):
        seen += 1
        if len(sealed) < TAG_BYTES:
            raise TruncatedProtectBlobError(
                f"the blob ends early, inside chunk {index}; restore it from an intact copy"
            )
        plain = place(len(sealed) - TAG_BYTES)
        try:
            aead.decrypt_into(chunk_nonce(header.nonce_prefix, index, last), sealed, None, plain)
        except Exception as exc:
            plain[:] = bytes(len(plain))  # decrypt_into leaves unauthenticated bytes behind
            raise _auth_failure(aead, header, bytes(sealed), index=index, last=last) from exc
        done(plain)
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
    held: list[bytearray] = []

    def place(n: int) -> memoryview:
        # Every chunk fits a chunk-size buffer: one serves them all.
        if not held:
            held.append(_take(header.chunk_size))
        return memoryview(held[0])[:n]

    header, raw, body = _open_header(src)
    aead = _key_for(header, raw, entropy, prefix)
    try:
        _open_chunks(header, aead, body, place, dst.write)
        return header
    finally:
        for out in held:
            _wipe(out, len(out))
        _give(*held)


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
    for index, chunk, last in _with_last(_slices(view, chunk_size, empty_chunk=True)):
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
        _wipe(result, filled)


def unprotect(
    blob: str | bytes, *, entropy: bytes = b"", prefix: str = DEFAULT_STORED_PREFIX
) -> bytes:
    """The data `protect` protected into `blob`, all or nothing (CryptUnprotectData)."""
    return unprotect_with_description(blob, entropy=entropy, prefix=prefix)[0]


def inspect(blob: str | bytes) -> ProtectHeader:
    """What `blob` says about itself (name, scope, version, uid, description), NOT authenticated."""
    return _split_blob(blob.encode("ascii", "replace") if isinstance(blob, str) else blob)[0]
