"""What each uid's requests may create in the keystore, checked before anything is written.

Two checks stand between a request and a new keystore entry (issue 20, point 2):

- **The uid's cap.** `charges/UID` (root 0600) holds how many entries, and how many bytes of
  entries, requests of that uid have created: its user-scope keys and the machine-scope keys its
  request made first. A new entry is charged under an flock of that file before it is linked
  (Keystore.create) and given back if the link fails or a concurrent creator won; a crash in
  between leaves the uid charged for one entry too many, never one too few. Root's own
  commands (`stored create`, `rotate`) charge nobody.
- **The requester's key quota.** The kernel charges the answer's payload to the requester's
  key quota at instantiation and refuses it (EDQUOT) when it does not fit: an entry written for
  such a request would be kept for nobody. /proc/key-users says how much of its quota a uid
  uses; the key under construction is already counted there.

Both read a few bytes: their cost does not grow with the keystore.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kmskeys import fileio
from kmskeys.keyusers import PROC_KEY_USERS, key_quota
from resolver.errors import KeystoreError, QuotaError, RefusedError

if TYPE_CHECKING:
    from resolver.keystore import Keystore

CHARGES_DIR = "charges"
_LEDGER = struct.Struct(">QQ")  # entries, bytes


class CapError(RefusedError):
    """The uid has created as many keystore entries (or bytes) as its cap allows (EKEYREJECTED);
    root raises keystore_entries_per_uid / keystore_bytes_per_uid or retires unused keys."""


class Ledger:
    """The keystore entries `uid`'s requests created, against the caps `entries` and `size`."""

    def __init__(self, store: Keystore, uid: int, entries: int, size: int) -> None:
        self.store, self.uid = store, uid
        self.max_entries, self.max_bytes = entries, size
        self._fd: int | None = None

    def _open(self, create: bool) -> int | None:
        flags = fileio.PRIVATE | (fileio.WRITE | fileio.CREATE if create else 0)
        with self.store.opened((CHARGES_DIR,), create=create) as dir_fd:
            if dir_fd is None:
                return None
            label = f"keystore {CHARGES_DIR}/{self.uid}"
            try:
                return fileio.open_file(str(self.uid), label, flags, dir_fd=dir_fd)
            except fileio.UntrustedFileError as exc:
                if exc.problem == fileio.MISSING:
                    return None
                raise KeystoreError(str(exc)) from None

    def _read(self, fd: int) -> tuple[int, int]:
        raw = os.pread(fd, _LEDGER.size + 1, 0)
        if not raw:
            return 0, 0
        if len(raw) != _LEDGER.size:
            raise KeystoreError(
                f"keystore {CHARGES_DIR}/{self.uid} is damaged ({len(raw)} bytes); remove it "
                "and the uid's count starts again from zero (docs/dpapi.md)"
            )
        entries, size = _LEDGER.unpack(raw)
        return entries, size

    def _write(self, fd: int, entries: int, size: int) -> None:
        os.pwrite(fd, _LEDGER.pack(max(entries, 0), max(size, 0)), 0)
        os.fsync(fd)

    def charged(self) -> tuple[int, int]:
        """(entries, bytes) charged to the uid so far."""
        fd = self._open(create=False)
        if fd is None:
            return 0, 0
        try:
            return self._read(fd)
        finally:
            os.close(fd)

    def check(self, size: int) -> None:
        """Refuse now if one more entry of `size` bytes would pass a cap (no lock: the charge
        under the lock decides; this spares a seal call that could not be kept)."""
        self._refuse(*self.charged(), size)

    def _refuse(self, entries: int, used: int, size: int) -> None:
        if entries + 1 > self.max_entries:
            raise CapError(
                f"uid {self.uid} has created {entries} keystore entries, its cap "
                f"(keystore_entries_per_uid = {self.max_entries}): refused, nothing was written; "
                "root raises the cap or retires what the uid no longer needs (docs/dpapi.md)"
            )
        if used + size > self.max_bytes:
            raise CapError(
                f"uid {self.uid}'s keystore entries take {used} bytes and this one {size}, past "
                f"its cap (keystore_bytes_per_uid = {self.max_bytes}): refused, nothing was "
                "written; root raises the cap or retires what the uid no longer needs"
            )

    @contextmanager
    def reserve(self, size: int) -> Iterator[object]:
        """Charge one entry of `size` bytes (or refuse) under the ledger's lock, held for the
        block; the charge is given back if the block raises."""
        fd = self._open(create=True)
        assert fd is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel drops it if we die
            entries, used = self._read(fd)
            self._refuse(entries, used, size)
            self._write(fd, entries + 1, used + size)
            self._fd = fd
            try:
                yield self
            except BaseException:
                self.release(size)
                raise
        finally:
            self._fd = None
            os.close(fd)

    def release(self, size: int) -> None:
        """Give back one entry of `size` bytes charged by the reservation in progress."""
        if self._fd is None:
            return
        entries, used = self._read(self._fd)
        self._write(self._fd, entries - 1, used - size)
        self._fd = None


def quota_room(uid: int) -> int | None:
    """Bytes left in `uid`'s kernel key quota, or None if /proc/key-users has no line for it."""
    try:
        quota = key_quota(uid, PROC_KEY_USERS)
    except OSError:
        return None
    return None if quota is None else quota.max_bytes - quota.used


def check_quota(uid: int, payload: int) -> None:
    """Refuse (EDQUOT) before writing an entry whose answer the kernel would refuse: the
    `payload` bytes must fit in the requester's key quota."""
    room = quota_room(uid)
    if room is not None and payload > room:
        raise QuotaError(
            f"uid {uid}'s key quota has {max(room, 0)} bytes left and the answer needs {payload}: "
            "refused, nothing was written; the user frees keys, or root raises the quota "
            "(kmskeys doctor says how)"
        )
