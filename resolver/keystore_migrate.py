"""Moving a keystore from the flat layout of kmskeys 0.1 to one directory per name.

0.1 kept every version of every name of a scope in one directory (`user/UID/NAME#VERSION`), so
finding a name's versions listed the whole scope: 100,000 names cost each miss a third of a
second. A name moves by hard-linking each of its entries into `NAME/VERSION` (the directory made
0700), fsyncing, then unlinking the flat names: at every instant each entry exists under one
name or both, never neither, and a crash at any point leaves a keystore the next run finishes.

The handler moves a name the first time it is asked for (Keystore._name_dir, a lookup or two,
never a listing); `kmskeys-resolver stored migrate` moves them all. A creator looks for a flat
version 1 before it makes a name's directory, and flat names go only once every link is in
place, so no new version 1 is ever made beside an old one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import Protocol

from resolver.errors import KeystoreError
from resolver.keystore_entry import EntryId, name_dir, parse_flat_name, scope_dir, write_error


class Keystore(Protocol):
    """What moving needs of resolver.keystore.Keystore (which imports this module)."""

    root: Path

    def open_dir(self, parent: int, part: str, shown: str, create: bool) -> int | None:
        """A checked directory below keystore_dir."""
        ...

    def opened(
        self, parts: tuple[str, ...], create: bool = False
    ) -> AbstractContextManager[int | None]:
        """An fd of keystore_dir/PARTS."""
        ...

    def scopes(self) -> Iterator[tuple[str, int | None]]:
        """Every scope directory."""
        ...


def flat_versions(scope_fd: int, name: str) -> list[int]:
    """The versions of NAME still in the flat layout, 1, 2, ... found by lookups alone."""
    found: list[int] = []
    while True:
        flat = f"{name_dir(name)}#{len(found) + 1}"
        try:
            os.stat(flat, dir_fd=scope_fd, follow_symlinks=False)
        except FileNotFoundError:
            return found
        found.append(len(found) + 1)


def move_name(store: Keystore, scope_fd: int, eid: EntryId, versions: list[int]) -> None:
    """Move the flat entries `versions` of eid's name into its own directory."""
    where = "/".join(eid.directory())
    shown = f"{where}/{eid.name_dir()}"
    fd = store.open_dir(scope_fd, eid.name_dir(), shown, create=True)
    if fd is None:
        raise KeystoreError(f"keystore {shown}: a directory vanished as it was made")
    try:
        for version in versions:
            _link(scope_fd, fd, EntryId(eid.scope, eid.uid, eid.name, version), where)
        os.fsync(fd)
        for version in versions:
            with suppress(FileNotFoundError):  # a concurrent mover was first
                os.unlink(
                    EntryId(eid.scope, eid.uid, eid.name, version).flat_name(), dir_fd=scope_fd
                )
        os.fsync(scope_fd)
    except OSError as exc:
        raise write_error(exc, store.root) from None
    finally:
        os.close(fd)


def _link(scope_fd: int, name_fd: int, eid: EntryId, where: str) -> None:
    flat = eid.flat_name()
    try:
        st = os.stat(flat, dir_fd=scope_fd, follow_symlinks=False)
    except FileNotFoundError:
        return  # moved meanwhile by a concurrent mover
    if not stat.S_ISREG(st.st_mode):
        raise KeystoreError(
            f"keystore {where}/{flat} is not a regular file; it is never moved or followed: "
            "restore it from a backup"
        )
    try:
        os.link(
            flat, eid.file_name(), src_dir_fd=scope_fd, dst_dir_fd=name_fd, follow_symlinks=False
        )
    except FileExistsError:
        there = os.stat(eid.file_name(), dir_fd=name_fd, follow_symlinks=False)
        if (there.st_dev, there.st_ino) != (st.st_dev, st.st_ino):
            raise KeystoreError(
                f"keystore {eid.shown()} and the flat {where}/{flat} both exist and differ; "
                "neither is touched: keep the one your backups hold and remove the other"
            ) from None


def migrate_all(store: Keystore) -> tuple[int, int]:
    """Move every name still in the flat layout; (names moved, entries moved)."""
    names = entries = 0
    for scope, uid in list(store.scopes()):
        with store.opened(scope_dir(scope, uid)) as scope_fd:
            if scope_fd is None:
                continue
            groups: dict[str, list[int]] = {}
            for part in os.listdir(scope_fd):
                flat = parse_flat_name(part)
                if flat is not None:
                    groups.setdefault(flat[0], []).append(flat[1])
            for name, versions in sorted(groups.items()):
                move_name(store, scope_fd, EntryId(scope, uid, name, 1), sorted(versions))
                names, entries = names + 1, entries + len(versions)
    return names, entries
