"""DPAPI's keys: the master key of (scope, NAME) through the kernel, and each blob's own key.

The master key is the `stored:` key the root resolver creates and keeps (docs/dpapi.md); a refusal
is explained (a scope the policy does not give, the keys of another account of this uid). Each
blob's AES-256-GCM key is derived from it with HKDF-SHA256 (bin/unprotect.c derives it the same
way). `cryptography` is imported on the first blob, never with this module.
"""

from __future__ import annotations

from kmskeys import fetch, keyutils
from kmskeys._hitpath import read_recent as _read_recent
from kmskeys.contract import DEFAULT_STORED_PREFIX
from kmskeys.errors import (
    KeyNotFoundError,
    KeyRejectedError,
    ScopeNotAllowedError,
    UnknownKeyVersionError,
    WrongUserError,
)
from kmskeys.stored import SCOPE_USER, SCOPES, StoredQuery, stored_description

TYPE_CHECKING = False  # not `from typing import`: a fresh `kmskeys unprotect` pays for typing
if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.hmac import HMAC


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


def blob_cipher(master: bytes, header: bytes, salt: bytes, entropy: bytes) -> AESGCM:
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
