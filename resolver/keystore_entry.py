"""One keystore entry: which key it holds (EntryId), its bytes (Entry) and where it lives.

    keystore_dir/user/UID/NAME/VERSION       (default keystore_dir: /var/lib/kmskeys)
    keystore_dir/machine/NAME/VERSION

A `/` in NAME is written `:` in its directory's name (no name contains `:`), so a scope is one
flat directory of names, each holding its versions: finding a name's versions opens one
directory by name and lists only that name's. Each entry ends with a SHA-256 of the rest
and holds the scope, uid, name and version its path says: a corrupt, truncated or misplaced
entry is refused, never regenerated. docs/dpapi.md has the entry format.
"""

from __future__ import annotations

import errno
import hashlib
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

from kmskeys.errors import InvalidNameError
from kmskeys.names import validate_name
from kmskeys.stored import MAX_VERSION, SCOPE_MACHINE, SCOPE_USER
from resolver.errors import (
    CorruptEntryError,
    KeystoreError,
    UnavailableError,
    errno_name,
)

SEAL_NONE = "none"
SEAL_KMS = "kms"
SEAL_PKCS11 = "pkcs11"  # resolver/tokenseal.py
VERSION_SEP = "#"
SLASH_IN_FILE = ":"
USER_DIR = "user"
MACHINE_DIR = "machine"
RETIRED_DIR = "retired"  # retired accounts' user directories (resolver/retire.py)

_MAGIC = b"KMSKST"
_FORMAT = 1
_SEAL_CODES = {SEAL_NONE: 0, SEAL_KMS: 1, SEAL_PKCS11: 2}
_CODE_SEALS = {code: seal for seal, code in _SEAL_CODES.items()}
_SCOPE_CODES = {SCOPE_USER: 1, SCOPE_MACHINE: 2}
_CODE_SCOPES = {code: scope for scope, code in _SCOPE_CODES.items()}
_NO_UID = 0xFFFFFFFF
# magic, format, seal, scope, uid, version, created (unix s), key size, name length
_HEAD = struct.Struct(">6sBBBIIQHB")
_U16 = struct.Struct(">H")
_DIGEST = 32
# Out of space or not writable now: the kernel does not cache EAGAIN, so the next request retries.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def scope_dir(scope: str, uid: int | None) -> tuple[str, ...]:
    """The directory of a scope (and uid), relative to keystore_dir."""
    return (USER_DIR, str(uid)) if scope == SCOPE_USER else (MACHINE_DIR,)


def name_dir(name: str) -> str:
    """The directory of NAME inside its scope directory."""
    return name.replace("/", SLASH_IN_FILE)


@dataclass(frozen=True)
class EntryId:
    """Which key an entry holds: scope, owner uid (user scope only), name and version."""

    scope: str
    uid: int | None
    name: str
    version: int

    def directory(self) -> tuple[str, ...]:
        """The scope directory, relative to keystore_dir."""
        return scope_dir(self.scope, self.uid)

    def name_dir(self) -> str:
        """The name's directory inside its scope directory."""
        return name_dir(self.name)

    def file_name(self) -> str:
        """The entry's file name inside its name directory: the version."""
        return str(self.version)

    def flat_name(self) -> str:
        """Its file name in the flat layout of kmskeys 0.1 (`NAME#VERSION` in the scope dir)."""
        return f"{self.name_dir()}{VERSION_SEP}{self.version}"

    def shown(self) -> str:
        """Its path below keystore_dir, for messages."""
        return "/".join((*self.directory(), self.name_dir(), self.file_name()))

    def __str__(self) -> str:
        owner = f"user:{self.uid}" if self.scope == SCOPE_USER else "machine"
        return f"{owner}/{self.name}#v{self.version}"


@dataclass(frozen=True)
class Entry:
    """One stored key: the key itself (seal "none"), its KMS ciphertext (seal "kms") or a
    token envelope (seal "pkcs11", `seal_key_arn` then `pkcs11:KEY_ID`)."""

    id: EntryId
    created: int
    key_size: int
    seal: str
    material: bytes
    seal_key_arn: str = ""

    def __repr__(self) -> str:  # never the material
        return f"Entry({self.id}, size={self.key_size}, seal={self.seal}, created={self.created})"

    def encode(self) -> bytes:
        """The entry file's bytes, ending with the SHA-256 of everything before it."""
        name = self.id.name.encode()
        arn = self.seal_key_arn.encode()
        body = (
            _HEAD.pack(
                _MAGIC,
                _FORMAT,
                _SEAL_CODES[self.seal],
                _SCOPE_CODES[self.id.scope],
                _NO_UID if self.id.uid is None else self.id.uid,
                self.id.version,
                self.created,
                self.key_size,
                len(name),
            )
            + name
            + _U16.pack(len(arn))
            + arn
            + _U16.pack(len(self.material))
            + self.material
        )
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decode(cls, data: bytes, expected: EntryId, shown: str) -> Entry:
        """Parse an entry file, which must be intact and be the entry `expected` names."""

        def corrupt(why: str) -> CorruptEntryError:
            return CorruptEntryError(
                f"keystore entry {shown} is corrupt ({why}); refused and left as it is, never "
                "regenerated: restore it from a backup (docs/dpapi.md)"
            )

        if len(data) < _HEAD.size + _DIGEST:
            raise corrupt(f"truncated to {len(data)} bytes")
        body, digest = data[:-_DIGEST], data[-_DIGEST:]
        if not secrets.compare_digest(hashlib.sha256(body).digest(), digest):
            raise corrupt("checksum mismatch")
        magic, fmt, seal_code, scope_code, uid, version, created, size, name_len = _HEAD.unpack(
            body[: _HEAD.size]
        )
        if magic != _MAGIC or fmt != _FORMAT:
            raise corrupt("not a kmskeys keystore entry of format 1")
        at = _HEAD.size
        name, at = body[at : at + name_len], at + name_len
        fields = []
        for _ in range(2):  # seal key ARN, material
            if at + _U16.size > len(body):
                raise corrupt("fields run past the end")
            (length,) = _U16.unpack(body[at : at + _U16.size])
            at += _U16.size
            fields.append(body[at : at + length])
            at += length
        if at != len(body):
            raise corrupt("fields do not fill the entry")
        arn, material = fields
        seal = _CODE_SEALS.get(seal_code)
        scope = _CODE_SCOPES.get(scope_code)
        found = EntryId(
            scope or "?",
            None if uid == _NO_UID else uid,
            name.decode("ascii", "replace"),
            version,
        )
        if found != expected:
            raise corrupt(f"it holds {found}")
        if seal is None or (seal == SEAL_NONE) != (not arn) or not material:
            raise corrupt("unknown seal")
        if seal == SEAL_NONE and len(material) != size:
            raise corrupt("key size mismatch")
        return cls(found, created, size, seal, material, arn.decode("ascii", "replace"))


def parse_version(file_name: str) -> int | None:
    """The version an entry's file name (in its name directory) stands for, or None for
    anything else (temp files, strays)."""
    if not file_name.isascii() or not file_name.isdigit() or file_name[0] == "0":
        return None
    if len(file_name) > 10 or int(file_name) > MAX_VERSION:
        return None
    return int(file_name)


def parse_name_dir(part: str) -> str | None:
    """The NAME a name directory stands for, or None (the account record, temp files)."""
    try:
        return validate_name(part.replace(SLASH_IN_FILE, "/"))
    except InvalidNameError:
        return None


def parse_flat_name(file_name: str) -> tuple[str, int] | None:
    """(NAME, version) of an entry file of the flat layout (`NAME#VERSION`), or None."""
    encoded, sep, digits = file_name.rpartition(VERSION_SEP)
    version = parse_version(digits) if sep else None
    name = parse_name_dir(encoded) if version is not None else None
    return None if name is None or version is None else (name, version)


def write_error(exc: OSError, root: Path) -> Exception:
    """The refusal for a failed write below keystore_dir: EAGAIN when out of space."""
    if exc.errno in _FULL_ERRNOS:
        return UnavailableError(
            f"keystore {root} cannot take a new entry ({errno_name(exc.errno or 0)}); nothing was "
            "written and existing entries are untouched: free space, then retry"
        )
    return KeystoreError(f"keystore {root}: cannot write ({exc.strerror})")
