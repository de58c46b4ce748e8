"""The host's keystore for `stored:` keys: one root-only file per (scope, uid, NAME, version).

    keystore_dir/user/UID/NAME#VERSION       (default keystore_dir: /var/lib/kmskeys)
    keystore_dir/machine/NAME#VERSION

A `/` in NAME is written `:` in the file name (no name contains `:`), so each scope is one flat
directory. Every directory must be root-owned with no group or other bits (0700), every entry
root-owned 0600, checked on each open through file descriptors (O_NOFOLLOW below keystore_dir).

An entry is written once and never again: into a temp file, fsync'd, then hard-linked to its name
(link() fails if the name exists, so of concurrent creators exactly one wins and the others read
the winner's entry), then the directory is fsync'd (kmskeys.fileio.write_new; every open here
goes through kmskeys.fileio too). Each entry ends with a SHA-256 of the rest: a
corrupt or truncated entry is refused, never regenerated, since a new key would make everything
protected under the old one unreadable. docs/dpapi.md has the entry format.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import struct
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from kmskeys import fileio
from kmskeys.errors import InvalidNameError
from kmskeys.names import validate_name
from kmskeys.stored import MAX_VERSION, SCOPE_MACHINE, SCOPE_USER
from resolver.errors import (
    CorruptEntryError,
    KeystoreError,
    UnavailableError,
    UnknownSecretError,
    errno_name,
)

# keystore_dir itself may be a link (root's choice, like blob_dir); below it, nothing is.
_ROOT_FLAGS = fileio.FOLLOW | fileio.PRIVATE
SEAL_NONE = "none"
SEAL_KMS = "kms"
SEAL_PKCS11 = "pkcs11"  # resolver/tokenseal.py
MAX_ENTRY_BYTES = 16 * 1024
# A temp file older than this is a creator's leftover (killed before it linked): no live
# handler runs longer than the 60 s maximum deadline.
STALE_TEMP_SECONDS = 600
TEMP_PREFIX = fileio.TEMP_PREFIX
VERSION_SEP = "#"
SLASH_IN_FILE = ":"

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


@dataclass(frozen=True)
class EntryId:
    """Which key an entry holds: scope, owner uid (user scope only), name and version."""

    scope: str
    uid: int | None
    name: str
    version: int

    def file_name(self) -> str:
        """The entry's file name inside its scope directory."""
        return f"{self.name.replace('/', SLASH_IN_FILE)}{VERSION_SEP}{self.version}"

    def directory(self) -> tuple[str, ...]:
        """The scope directory, relative to keystore_dir."""
        return ("user", str(self.uid)) if self.scope == SCOPE_USER else ("machine",)

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


def parse_file_name(file_name: str) -> tuple[str, int] | None:
    """(NAME, version) of an entry file name, or None for anything else (temp files, strays)."""
    encoded, sep, digits = file_name.rpartition(VERSION_SEP)
    if not sep or not digits.isascii() or not digits.isdigit() or digits[0] == "0":
        return None
    if len(digits) > 10 or int(digits) > MAX_VERSION:
        return None
    try:
        return validate_name(encoded.replace(SLASH_IN_FILE, "/")), int(digits)
    except InvalidNameError:
        return None


@dataclass(frozen=True)
class Listed:
    """One entry as `stored list` shows it: its id, and its metadata or why it is unreadable."""

    id: EntryId
    entry: Entry | None
    problem: str | None


class Keystore:
    """The keystore below `root`; every call re-checks ownership and modes on the way."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # --- opening, checked (kmskeys.fileio: root's, 0700 directories, 0600 entries) --------

    def _open_root(self) -> int:
        parent = self.root.parent
        try:
            label = f"keystore_dir parent {parent}"
            fileio.check_path(parent, label, fileio.DIRECTORY, fileio.FOLLOW)
            return fileio.open_dir(self.root, f"keystore_dir {self.root}", _ROOT_FLAGS)
        except fileio.UntrustedFileError as exc:
            if exc.problem == fileio.MISSING and exc.path == os.fspath(self.root):
                # Never created here: a keystore that vanished may hold keys that must not be
                # replaced by new ones without anyone noticing.
                raise KeystoreError(
                    f"keystore_dir {self.root} does not exist; create it with "
                    "kmskeys-resolver install --rules stored (or restore it from a backup)"
                ) from None
            raise KeystoreError(str(exc)) from None

    def _open_dir(self, parent: int, part: str, shown: str, create: bool) -> int | None:
        flags = fileio.PRIVATE | (fileio.CREATE if create else 0)
        try:
            return fileio.open_dir(part, f"keystore {shown}", flags, dir_fd=parent)
        except fileio.UntrustedFileError as exc:
            if exc.problem == fileio.MISSING:
                return None
            raise KeystoreError(str(exc)) from None
        except OSError as exc:  # making it failed: out of space, read-only
            raise _write_error(exc, self.root) from None

    def _scope_dir(self, root: int, eid: EntryId, create: bool) -> int | None:
        """The scope directory of `eid` (made when `create`), or None when it does not exist."""
        parts = eid.directory()
        fd = root
        for index, part in enumerate(parts):
            try:
                child = self._open_dir(fd, part, "/".join(parts[: index + 1]), create)
            finally:
                if fd != root:
                    os.close(fd)
            if child is None:
                return None
            fd = child
        return fd

    # --- reading ------------------------------------------------------------------------------

    def versions(self, scope: str, uid: int | None, name: str) -> list[int]:
        """The versions kept for (scope, uid, name), ascending; [] when there are none."""
        probe = EntryId(scope, uid, name, 1)
        root = self._open_root()
        try:
            fd = self._scope_dir(root, probe, create=False)
            if fd is None:
                return []
            try:
                return _versions_in(fd, name)
            finally:
                os.close(fd)
        finally:
            os.close(root)

    def read(self, eid: EntryId) -> Entry:
        """The intact entry `eid`; UnknownSecretError if it does not exist."""
        root = self._open_root()
        try:
            fd = self._scope_dir(root, eid, create=False)
            if fd is None:
                raise UnknownSecretError(f"no keystore entry {eid}")
            try:
                return self._read_entry(fd, eid)
            finally:
                os.close(fd)
        finally:
            os.close(root)

    def _read_entry(self, dir_fd: int, eid: EntryId) -> Entry:
        shown = "/".join((*eid.directory(), eid.file_name()))
        label = f"keystore entry {shown}"
        try:
            data = fileio.read_file(
                eid.file_name(), MAX_ENTRY_BYTES, label, fileio.PRIVATE, dir_fd=dir_fd
            )
        except fileio.UntrustedFileError as exc:
            if exc.problem == fileio.MISSING:
                raise UnknownSecretError(f"no keystore entry {eid}") from None
            if exc.problem == fileio.TOO_LARGE:
                raise CorruptEntryError(str(exc)) from None
            raise KeystoreError(str(exc)) from None
        except OSError as exc:
            raise KeystoreError(f"{label}: {exc.strerror}") from None
        return Entry.decode(data, eid, shown)

    # --- creating -----------------------------------------------------------------------------

    def create(self, entry: Entry) -> tuple[Entry, bool]:
        """Store `entry` unless its name exists; (the entry now stored, True if it is ours)."""
        data = entry.encode()
        root = self._open_root()
        try:
            fd = self._scope_dir(root, entry.id, create=True)
            if fd is None:  # removed again between our mkdir and open
                raise KeystoreError(f"keystore {self.root}: a directory vanished as it was made")
            try:
                _sweep_stale_temps(fd)
                try:
                    won = fileio.write_new(fd, entry.id.file_name(), data, 0o600)
                except OSError as exc:
                    raise _write_error(exc, self.root) from None
                if won:
                    return entry, True
                return self._read_entry(fd, entry.id), False
            finally:
                os.close(fd)
        finally:
            os.close(root)

    # --- listing ------------------------------------------------------------------------------

    def scan(self) -> Iterator[Listed]:
        """Every entry, for `stored list`: metadata, or why it cannot be read (never raises on
        one bad entry)."""
        root = self._open_root()
        try:
            for scope, uid in self._scope_dirs(root):
                probe = EntryId(scope, uid, "x", 1)
                fd = self._scope_dir(root, probe, create=False)
                if fd is None:
                    continue
                try:
                    for file_name in sorted(os.listdir(fd)):
                        parsed = parse_file_name(file_name)
                        if parsed is None:
                            continue
                        eid = EntryId(scope, uid, *parsed)
                        try:
                            yield Listed(eid, self._read_entry(fd, eid), None)
                        except (KeystoreError, UnknownSecretError) as exc:
                            yield Listed(eid, None, exc.reason)
                finally:
                    os.close(fd)
        finally:
            os.close(root)

    def _scope_dirs(self, root: int) -> Iterator[tuple[str, int | None]]:
        if self._open_dir_exists(root, "machine"):
            yield SCOPE_MACHINE, None
        users = self._open_dir(root, "user", "user", create=False)
        if users is None:
            return
        try:
            uids = sorted(int(n) for n in os.listdir(users) if n.isascii() and n.isdigit())
        finally:
            os.close(users)
        for uid in uids:
            yield SCOPE_USER, uid

    def _open_dir_exists(self, root: int, part: str) -> bool:
        fd = self._open_dir(root, part, part, create=False)
        if fd is None:
            return False
        os.close(fd)
        return True


def _versions_in(dir_fd: int, name: str) -> list[int]:
    found = []
    for file_name in os.listdir(dir_fd):
        parsed = parse_file_name(file_name)
        if parsed is not None and parsed[0] == name:
            found.append(parsed[1])
    return sorted(found)


def _write_error(exc: OSError, root: Path) -> Exception:
    if exc.errno in _FULL_ERRNOS:
        return UnavailableError(
            f"keystore {root} cannot take a new entry ({errno_name(exc.errno or 0)}); nothing was "
            "written and existing entries are untouched: free space, then retry"
        )
    return KeystoreError(f"keystore {root}: cannot write ({exc.strerror})")


def _sweep_stale_temps(dir_fd: int) -> None:
    now = time.time()
    for file_name in os.listdir(dir_fd):
        if not file_name.startswith(TEMP_PREFIX):
            continue
        with suppress(OSError):
            st = os.stat(file_name, dir_fd=dir_fd, follow_symlinks=False)
            if now - st.st_mtime > STALE_TEMP_SECONDS:
                os.unlink(file_name, dir_fd=dir_fd)
