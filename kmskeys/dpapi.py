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

from kmskeys import fetch, keyutils
from kmskeys._hitpath import read_recent as _read_recent
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
    parse_header,
    read_header,
    to_text,
)
from kmskeys.stored import SCOPE_MACHINE, SCOPE_USER, SCOPES, StoredQuery, stored_description

TYPE_CHECKING = False  # not `from typing import`: a fresh `kmskeys unprotect` pays for typing
if TYPE_CHECKING:
    from typing import Protocol

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.hmac import HMAC

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
_TEXT_PREFIX = TEXT_PREFIX.encode()
_EMPTY_SHA256 = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


# --- the master key, through the kernel ---------------------------------------------------------


# The caller's filesystem uid: the uid the kernel gives its keys, passes as %u and checks
# key permissions with.
fsuid = keyutils.current_fsuid


# The descriptions of (prefix, name, kind, scope, version), built and validated once each.
_DESCRIPTIONS: dict[tuple[str, str, str, str | None, int], bytes] = {}


def _description(prefix: str, name: str, kind: str, scope: str | None, version: int = 1) -> bytes:
    key = (prefix, name, kind, scope, version)
    desc = _DESCRIPTIONS.get(key)
    if desc is None:
        desc = stored_description(prefix, name, StoredQuery(kind, scope, version)).encode()
        if len(_DESCRIPTIONS) < 1024:
            _DESCRIPTIONS[key] = desc
    return desc


# The serial each description was last fetched as, for the one-syscall hit (as get_secret's).
_SERIALS: dict[bytes, int] = {}


def _read_owned(desc: bytes) -> bytes:
    # As get_secret's path (kmskeys/_hitpath.c): a keyring shared with another uid may hold a
    # key that uid planted under this description, so only a key owned by our fsuid is read
    # (KeyOwnershipError otherwise); a serial this thread checked so in the last second is
    # read again with one keyctl_read, which the kernel still checks.
    serial = _SERIALS.get(desc)
    if serial is not None:
        payload = _read_recent(serial)
        if payload is not None:
            return payload
    serial, payload = fetch(desc, _MASTER_KEY_CALLOUT, 0)
    if len(_SERIALS) < 1024:
        _SERIALS[desc] = serial
    return payload


def _diagnose(prefix: str, name: str, scope: str, refused: KeyRejectedError) -> Exception:
    """Why the resolver refused a master key: a scope the policy does not give, user keys of
    another account, or `refused`."""
    try:
        policy = _read_owned(_description(prefix, name, StoredQuery.SCOPE, None))
    except KeyRejectedError:
        return refused
    held = policy.decode("ascii", "replace")
    if held in SCOPES and held != scope:
        return ScopeNotAllowedError(
            f"scope not allowed by policy: {name!r} is {held}-scoped on this host, not {scope}; "
            f"protect it with scope={held!r}, or have the admin add "
            f'[stored."{name}"] scope = "{scope}" to the resolver config'
        )
    return (_account_refusal(prefix, name) if held == SCOPE_USER else None) or refused


def _account_refusal(prefix: str, name: str) -> Exception | None:
    """WrongUserError when this uid's user keys belong to another account (a reused uid)."""
    try:
        standing = _read_owned(_description(prefix, name, StoredQuery.ACCOUNT, None))
    except KeyRejectedError:
        return None
    if standing not in (b"other", b"retired"):
        return None
    me = fsuid()
    how = "were retired" if standing == b"retired" else "belong to another account of this uid"
    return WrongUserError(
        f"the keys of uid {me} on this host {how} (a uid reused after userdel, or a user "
        f"renamed): they never open for another account; ask root to run kmskeys-resolver "
        f"stored retire --uid {me}, which gives this account keys of its own"
    )


def latest_version(name: str, scope: str, prefix: str = DEFAULT_STORED_PREFIX) -> int:
    """The newest master-key version of (scope, NAME); the resolver creates version 1 if none."""
    desc = _description(prefix, name, StoredQuery.LATEST, scope)
    try:
        raw = _read_owned(desc)
    except KeyRejectedError as exc:
        raise _diagnose(prefix, name, scope, exc) from None
    if not raw.isdigit():
        raise KeyRejectedError(f"{desc.decode()}: the resolver's answer is not a version number")
    return int(raw)


def master_key(
    name: str,
    scope: str,
    version: int,
    prefix: str = DEFAULT_STORED_PREFIX,
) -> bytes:
    """Version `version` of the master key of (scope, NAME), from the kernel cache or resolver."""
    desc = _description(prefix, name, StoredQuery.KEY, scope, version)
    try:
        key = _read_owned(desc)
    except KeyNotFoundError:
        raise UnknownKeyVersionError(
            f"{desc.decode()}: this host's keystore has no version {version} of the {scope}-scope "
            f"key {name!r}; unprotect on the host that protected the data, or restore its keystore "
            "(kmskeys-resolver stored list shows the versions kept); a user-scope blob of an "
            "account removed since (userdel) opens only with that account's retired keys"
        ) from None
    except KeyRejectedError as exc:
        raise _diagnose(prefix, name, scope, exc) from None
    if len(key) != MASTER_KEY_BYTES:
        raise KeyRejectedError(f"{desc.decode()}: the master key is {len(key)} bytes, not 32")
    return key


# --- one blob's key -----------------------------------------------------------------------------


_CRYPTO: list[tuple[type[HMAC], type[AESGCM], type[hashes.Hash], hashes.SHA256]] = []


def _crypto() -> tuple[type[HMAC], type[AESGCM], type[hashes.Hash], hashes.SHA256]:
    # Imported on the first blob, not with this module; then looked up once, not per blob.
    if not _CRYPTO:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.hmac import HMAC

        _CRYPTO.append((HMAC, AESGCM, hashes.Hash, hashes.SHA256()))
    return _CRYPTO[0]


def _blob_cipher(master: bytes, header: bytes, salt: bytes, entropy: bytes) -> AESGCM:
    hmac, aesgcm, hash_, sha256 = _crypto()
    if entropy:
        digest = hash_(sha256)
        digest.update(entropy)
        entropy_hash = digest.finalize()
    else:
        entropy_hash = _EMPTY_SHA256
    # HKDF-SHA256 (RFC 5869) of the master key for 32 bytes, which is one block: extract,
    # then expand with the counter byte 1. Two HMAC calls (cryptography's HKDF class is the
    # same two, behind more Python). The header is in the info: change one byte of it (scope,
    # uid, name, version, description, chunk size, nonce prefix) and the key, so every chunk,
    # no longer matches.
    extract = hmac(salt, sha256)
    extract.update(master)
    expand = hmac(extract.finalize(), sha256)
    expand.update(_HKDF_INFO + entropy_hash + header + b"\x01")
    return aesgcm(expand.finalize())


# --- chunks -------------------------------------------------------------------------------------


def _wipe(buf: bytearray | memoryview, size: int) -> None:
    """Zero the first `size` bytes of `buf` (plaintext our code held): one memset."""
    keyutils.explicit_bzero(buf, size)


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
    """(index, item, is_last) for each item of a stream: one item of lookahead.

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


def _pieces(
    view: memoryview, size: int, *, empty_chunk: bool
) -> list[tuple[int, memoryview, bool]]:
    """(index, chunk, is_last) for each chunk of a view in memory: slices, no copy."""
    if not view:
        return [(0, view, True)] if empty_chunk else []
    last = (len(view) - 1) // size
    return [(i, view[i * size : (i + 1) * size], i == last) for i in range(last + 1)]


def _unread_bytes(src: io.BytesIO) -> memoryview | None:
    """The unread part of an io.BytesIO as a view of its own bytes, or None.

    CPython's getvalue() returns the object's bytes without a copy unless a view of them is
    exported (getbuffer()), when it returns a copy, which would be plaintext of ours that a
    bytes object cannot wipe: that case is told by truncate() at the current size, a no-op that
    raises BufferError while a view is exported, and is read into buffers of ours instead.
    Otherwise the position moves to the end, as reading it all would leave it.
    """
    at = src.tell()
    end = src.seek(0, io.SEEK_END)
    try:
        src.truncate(end)
    except BufferError:
        src.seek(at)
        return None
    return memoryview(src.getvalue())[at:]


class _Chunks:
    """(index, chunk, is_last) for the chunks of `src`, `size` bytes each but the last: slices
    of bytes already in memory (a memoryview, or an io.BytesIO's own bytes: reading them into a
    buffer of ours would be one more copy, of the plaintext, which would then need wiping), or
    reads of a stream into two alternating buffers, which `release(wipe=True)` zeroes once, at
    the end.

    `empty_chunk`: an empty input is one empty chunk (plaintext), or no chunk (ciphertext).
    """

    def __init__(self, src: Reader | memoryview, size: int, *, empty_chunk: bool) -> None:
        if isinstance(src, io.BytesIO):
            src = _unread_bytes(src) or src
        self.src, self.size, self.empty_chunk = src, size, empty_chunk
        self.buffers: tuple[bytearray, ...] = ()
        self.used = [0, 0]

    def __iter__(self) -> Iterator[tuple[int, memoryview, bool]]:
        if isinstance(self.src, memoryview):
            return iter(_pieces(self.src, self.size, empty_chunk=self.empty_chunk))
        return _with_last(self._read(self.src))

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
        for index, chunk, last in chunks:
            sealed = memoryview(out)[: len(chunk) + TAG_BYTES]
            aead.encrypt_into(chunk_nonce(header.nonce_prefix, index, last), chunk, None, sealed)
            dst.write(sealed)
    finally:
        chunks.release(wipe=True)  # plaintext
        _give(out)  # ciphertext
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
        whole = _unread_bytes(src)
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
    return _blob_cipher(master_key(name, scope, version, prefix), raw, salt, entropy)


def _open_chunks(
    header: ProtectHeader,
    aead: AESGCM,
    body: Reader | memoryview,
    place: Callable[[int], memoryview],
    done: Callable[[memoryview], object],
) -> None:
    """Authenticate and decrypt every chunk of `body` into `place(n)`, then `done(that view)`."""
    size = header.chunk_size + TAG_BYTES
    # Chunks in memory are sliced with no _Chunks at all: a blob of one chunk is the common case.
    chunks: _Chunks | None = None
    pieces: Iterable[tuple[int, memoryview, bool]]
    if isinstance(body, memoryview):
        pieces = _pieces(body, size, empty_chunk=False)
    else:
        chunks = pieces = _Chunks(body, size, empty_chunk=False)
    prefix = header.nonce_prefix
    seen = 0
    try:
        for index, sealed, last in pieces:
            seen += 1
            if len(sealed) < TAG_BYTES:
                raise TruncatedProtectBlobError(
                    f"the blob ends early, inside chunk {index}; restore it from an intact copy"
                )
            plain = place(len(sealed) - TAG_BYTES)
            try:
                aead.decrypt_into(chunk_nonce(prefix, index, last), sealed, None, plain)
            except Exception as exc:
                _wipe(plain, len(plain))  # decrypt_into leaves unauthenticated bytes behind
                raise _auth_failure(aead, header, bytes(sealed), index=index, last=last) from exc
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
    out = _take(header.chunk_size)
    view = memoryview(out)
    used = 0

    def place(n: int) -> memoryview:
        nonlocal used
        used = max(used, n)
        return view[:n]

    try:
        _open_chunks(header, aead, body, place, dst.write)
        return header
    finally:
        _wipe(out, used)
        _give(out)


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
    for index, chunk, last in _pieces(view, chunk_size, empty_chunk=True):
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
