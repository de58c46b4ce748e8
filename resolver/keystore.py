"""The host's keystore for `stored:` keys: root-only directories, one file per key version.

    keystore_dir/                      root 0700 (default /var/lib/kmskeys)
      user/UID/.account                the account the user's keys are bound to (accounts.py)
      user/UID/NAME/VERSION            the entries of the uid's user-scope keys
      machine/NAME/VERSION             the host's machine-scope keys
      charges/UID                      what the uid's requests created (charges.py)
      retired/UID/ACCOUNT/             user directories of retired accounts (retire.py)

Every directory must be root-owned with no group or other bits (0700), every entry root-owned
0600, checked on each open through file descriptors (O_NOFOLLOW below keystore_dir). Finding a
name's versions opens its directory by name and lists it: it costs the same with one name in
the scope or a hundred thousand (the kernel looks a name up in a directory by hash, on ext4 and
tmpfs alike).

An entry is written once and never again: into a temp file, fsync'd, then hard-linked to its name
(link() fails if the name exists, so of concurrent creators exactly one wins and the others read
the winner's entry), then the directory is fsync'd (kmskeys.fileio.write_new). Each entry ends
with a SHA-256 of the rest: a corrupt or truncated entry is refused, never regenerated, since a
new key would make everything protected under the old one unreadable. A keystore of the flat
layout of kmskeys 0.1 (`user/UID/NAME#VERSION`) is moved to this one name by name on first use,
or all at once by `kmskeys-resolver stored migrate` (resolver/keystore_migrate.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kmskeys import fileio
from kmskeys.stored import SCOPE_MACHINE, SCOPE_USER
from resolver import keystore_migrate as migrate
from resolver.errors import CorruptEntryError, KeystoreError, UnknownSecretError
from resolver.keystore_entry import (
    MACHINE_DIR,
    SEAL_KMS,
    SEAL_NONE,
    SEAL_PKCS11,
    USER_DIR,
    Entry,
    EntryId,
    parse_flat_name,
    parse_name_dir,
    parse_version,
    scope_dir,
    write_error,
)

__all__ = [
    "MAX_ENTRY_BYTES",
    "SEAL_KMS",
    "SEAL_NONE",
    "SEAL_PKCS11",
    "Entry",
    "EntryId",
    "Keystore",
    "Listed",
    "Reservation",
]

# keystore_dir itself may be a link (root's choice, like blob_dir); below it, nothing is.
_ROOT_FLAGS = fileio.FOLLOW | fileio.PRIVATE
MAX_ENTRY_BYTES = 16 * 1024
# A temp file older than this is a creator's leftover (killed before it linked): no live
# handler runs longer than the 60 s maximum deadline.
STALE_TEMP_SECONDS = 600
TEMP_PREFIX = fileio.TEMP_PREFIX


class Reservation(Protocol):
    """What a new entry is charged against (resolver/charges.py): held while it is written."""

    def reserve(self, size: int) -> AbstractContextManager[object]:
        """Charge `size` bytes and one entry, or refuse; uncharged if the block raises."""
        ...

    def release(self, size: int) -> None:
        """Give back a charge whose entry was not ours after all (a concurrent creator won)."""
        ...


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

    def open_dir(self, parent: int, part: str, shown: str, create: bool) -> int | None:
        """The checked directory `part` of `parent` (made when `create`), None if missing."""
        flags = fileio.PRIVATE | (fileio.CREATE if create else 0)
        try:
            return fileio.open_dir(part, f"keystore {shown}", flags, dir_fd=parent)
        except fileio.UntrustedFileError as exc:
            if exc.problem == fileio.MISSING:
                return None
            raise KeystoreError(str(exc)) from None
        except OSError as exc:  # making it failed: out of space, read-only
            raise write_error(exc, self.root) from None

    @contextmanager
    def opened(self, parts: tuple[str, ...], create: bool = False) -> Iterator[int | None]:
        """An fd of keystore_dir/PARTS (made when `create`), or None when it does not exist;
        closed after the block."""
        root = self._open_root()
        fd: int | None = root
        try:
            for index, part in enumerate(parts):
                assert fd is not None
                child = self.open_dir(fd, part, "/".join(parts[: index + 1]), create)
                if fd != root:
                    os.close(fd)
                fd = child
                if fd is None:
                    break
            yield fd
        finally:
            if fd is not None and fd != root:
                os.close(fd)
            os.close(root)

    def _name_dir(self, scope_fd: int, eid: EntryId, create: bool) -> int | None:
        """The directory of `eid`'s name (made when `create`), moved out of the flat layout of
        kmskeys 0.1 first if that is where the name still is."""
        part, shown = eid.name_dir(), "/".join((*eid.directory(), eid.name_dir()))
        fd = self.open_dir(scope_fd, part, shown, create=False)
        if fd is None and (flat := migrate.flat_versions(scope_fd, eid.name)):
            # Checked before any creation: a name whose entries are still flat is moved, never
            # given a new version 1 beside its old one.
            migrate.move_name(self, scope_fd, eid, flat)
            fd = self.open_dir(scope_fd, part, shown, create=False)
        if fd is None and create:
            fd = self.open_dir(scope_fd, part, shown, create=True)
        return fd

    @contextmanager
    def _name(self, eid: EntryId, create: bool = False) -> Iterator[int | None]:
        with self.opened(eid.directory(), create) as scope_fd:
            fd = None if scope_fd is None else self._name_dir(scope_fd, eid, create)
            try:
                yield fd
            finally:
                if fd is not None:
                    os.close(fd)

    # --- reading ------------------------------------------------------------------------------

    def versions(self, scope: str, uid: int | None, name: str) -> list[int]:
        """The versions kept for (scope, uid, name), ascending; [] when there are none."""
        with self._name(EntryId(scope, uid, name, 1)) as fd:
            return [] if fd is None else versions_in(fd)

    def read(self, eid: EntryId) -> Entry:
        """The intact entry `eid`; UnknownSecretError if it does not exist."""
        with self._name(eid) as fd:
            if fd is None:
                raise UnknownSecretError(f"no keystore entry {eid}")
            return self.read_entry(fd, eid)

    def read_entry(self, dir_fd: int, eid: EntryId) -> Entry:
        """The intact entry `eid` in its name directory `dir_fd`."""
        shown = eid.shown()
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

    def create(self, entry: Entry, charge: Reservation | None = None) -> tuple[Entry, bool]:
        """Store `entry` unless its name exists; (the entry now stored, True if it is ours).

        `charge` (the requester's ledger) is charged before the entry is linked and given back
        if the link fails or a concurrent creator won: a crash in between leaves the uid
        charged for an entry that does not exist, never the reverse.
        """
        data = entry.encode()
        with self._name(entry.id, create=True) as fd:
            if fd is None:  # removed again between our mkdir and open
                raise KeystoreError(f"keystore {self.root}: a directory vanished as it was made")
            _sweep_stale_temps(fd)
            held = charge.reserve(len(data)) if charge is not None else nullcontext()
            with held:
                try:
                    won = fileio.write_new(fd, entry.id.file_name(), data, 0o600)
                except OSError as exc:
                    raise write_error(exc, self.root) from None
                if not won and charge is not None:
                    charge.release(len(data))
            if won:
                return entry, True
            return self.read_entry(fd, entry.id), False

    # --- listing ------------------------------------------------------------------------------

    def scan(self) -> Iterator[Listed]:
        """Every entry, for `stored list`: metadata, or why it cannot be read (never raises on
        one bad entry)."""
        for scope, uid in self.scopes():
            with self.opened(scope_dir(scope, uid)) as scope_fd:
                if scope_fd is None:
                    continue
                for part in sorted(os.listdir(scope_fd)):
                    yield from self._scan_name(scope_fd, scope, uid, part)

    def _scan_name(self, scope_fd: int, scope: str, uid: int | None, part: str) -> Iterator[Listed]:
        flat = parse_flat_name(part)
        if flat is not None:
            eid = EntryId(scope, uid, *flat)
            yield Listed(
                eid, None, "flat layout of kmskeys 0.1: run kmskeys-resolver stored migrate"
            )
            return
        name = parse_name_dir(part)
        if name is None:
            return  # the account record, temp files
        probe = EntryId(scope, uid, name, 1)
        try:
            fd = self.open_dir(scope_fd, part, "/".join((*scope_dir(scope, uid), part)), False)
        except KeystoreError as exc:
            yield Listed(probe, None, exc.reason)
            return
        if fd is None:
            return
        try:
            for version in versions_in(fd):
                eid = EntryId(scope, uid, name, version)
                try:
                    yield Listed(eid, self.read_entry(fd, eid), None)
                except (KeystoreError, UnknownSecretError) as exc:
                    yield Listed(eid, None, exc.reason)
        finally:
            os.close(fd)

    def scopes(self) -> Iterator[tuple[str, int | None]]:
        """(scope, uid) of every scope directory: machine, then each uid's, ascending."""
        with self.opened((MACHINE_DIR,)) as machine:
            if machine is not None:
                yield SCOPE_MACHINE, None
        with self.opened((USER_DIR,)) as users:
            uids = [] if users is None else [n for n in os.listdir(users) if n.isdigit()]
        for uid in sorted(int(n) for n in uids if n.isascii()):
            yield SCOPE_USER, uid


def versions_in(dir_fd: int) -> list[int]:
    """The versions a name directory holds, ascending."""
    found = (parse_version(file_name) for file_name in os.listdir(dir_fd))
    return sorted(version for version in found if version is not None)


def _sweep_stale_temps(dir_fd: int) -> None:
    now = time.time()
    for file_name in os.listdir(dir_fd):
        if not file_name.startswith(TEMP_PREFIX):
            continue
        with suppress(OSError):
            st = os.stat(file_name, dir_fd=dir_fd, follow_symlinks=False)
            if now - st.st_mtime > STALE_TEMP_SECONDS:
                os.unlink(file_name, dir_fd=dir_fd)
