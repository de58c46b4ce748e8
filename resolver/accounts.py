"""A user's keystore belongs to one account, never to the next holder of its uid (issue 20.5).

Windows binds a user's DPAPI keys to a SID, which is never reused; `useradd` reuses a freed uid
by default. So the first user-scope entry of a uid also writes `user/UID/.account` (root 0600,
written once): the uid, the user name the uid had then ("" for a uid with no passwd entry), a
random 16-byte account id and the time. Every user-scope request checks it: a requester whose
user name differs (the uid now belongs to someone else) or whose account was retired is refused,
and nothing of the old account's reaches it. `kmskeys-resolver stored retire` (resolver/retire.py)
marks the account retired (`.retired`, written once) and moves its directory aside, so that the
uid's next account starts with keys of its own.

A keystore from before account records is bound on first use to the uid's user then. The same
user name with the same uid again (userdel, then useradd of the same name) looks like the same
account to the host: the userdel hook, which retires the keys when the account goes, is what
tells the two apart (docs/dpapi.md).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kmskeys import fileio
from resolver.errors import KeystoreError, RefusedError
from resolver.keystore_entry import USER_DIR

if TYPE_CHECKING:
    from resolver.keystore import Keystore

ACCOUNT_FILE = ".account"
RETIRED_FILE = ".retired"
IDENT_BYTES = 16
MAX_RECORD_BYTES = 1024
# What `NAME#account` answers (kmskeys.stored): the requester's standing with its uid's keys.
STATUS_OK, STATUS_OTHER, STATUS_RETIRED = "ok", "other", "retired"

_ACCOUNT = struct.Struct(">6sBIQ16sB")  # magic, format, uid, created, account id, name length
_RETIRED = struct.Struct(">6sBIQ16s")  # magic, format, uid, retired, account id
_DIGEST = 32


class AccountError(RefusedError):
    """The uid's keys belong to another account, or to a retired one (EKEYREJECTED); root
    retires them (kmskeys-resolver stored retire) so that the uid's new account gets its own."""

    alarm = True


def _sealed(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def _opened(data: bytes, magic: bytes, head: struct.Struct, shown: str) -> tuple[Any, bytes]:
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if (
        len(data) < head.size + _DIGEST
        or not secrets.compare_digest(hashlib.sha256(body).digest(), digest)
        or body[:6] != magic
        or body[6] != 1
    ):
        raise KeystoreError(
            f"keystore {shown} is corrupt; refused and left as it is: restore it from a backup"
        )
    return head.unpack(body[: head.size]), body[head.size :]


@dataclass(frozen=True)
class Account:
    """Who a uid's user-scope keys belong to."""

    uid: int
    name: str  # the user name when the account was bound; "" for a uid with no passwd entry
    ident: bytes
    created: int
    retired: int | None = None

    def encode(self) -> bytes:
        """The `.account` file's bytes."""
        name = self.name.encode()
        head = _ACCOUNT.pack(b"KMSKAC", 1, self.uid, self.created, self.ident, len(name))
        return _sealed(head + name)

    def retired_marker(self, when: int) -> bytes:
        """The `.retired` file's bytes."""
        return _sealed(_RETIRED.pack(b"KMSKRT", 1, self.uid, when, self.ident))

    @classmethod
    def decode(cls, data: bytes, uid: int, shown: str) -> Account:
        """An intact record of `uid`'s account."""
        (_, _, found, created, ident, size), name = _opened(data, b"KMSKAC", _ACCOUNT, shown)
        if found != uid or len(name) != size:
            raise KeystoreError(f"keystore {shown} is corrupt or misplaced (uid {found}); refused")
        return cls(uid, name.decode("utf-8", "replace"), ident, created)

    def describe(self) -> str:
        """`'alice' (account 3f2a9c0d41be, bound 2026-12-01)`, for messages."""
        who = repr(self.name) if self.name else "a uid with no user name"
        return f"{who} (account {self.ident.hex()[:12]}, bound {_day(self.created)})"


def _day(when: int) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d")


def new_account(uid: int, name: str | None) -> Account:
    """A fresh account record for `uid`, whose user is `name` (None: no passwd entry)."""
    return Account(uid, name or "", secrets.token_bytes(IDENT_BYTES), int(time.time()))


def read_account(user_fd: int, uid: int) -> Account | None:
    """The account record in the user directory `user_fd`, with its retirement; None if none."""
    shown = f"{USER_DIR}/{uid}/{ACCOUNT_FILE}"
    account = _read(user_fd, ACCOUNT_FILE, shown)
    if account is None:
        return None
    record = Account.decode(account, uid, shown)
    marker = _read(user_fd, RETIRED_FILE, f"{USER_DIR}/{uid}/{RETIRED_FILE}")
    if marker is None:
        return record
    marker_shown = f"{USER_DIR}/{uid}/{RETIRED_FILE}"
    (_, _, found, when, ident), _ = _opened(marker, b"KMSKRT", _RETIRED, marker_shown)
    if (found, ident) != (uid, record.ident):
        raise KeystoreError(f"keystore {USER_DIR}/{uid}/{RETIRED_FILE} is of another account")
    return replace(record, retired=when)


def _read(dir_fd: int, file_name: str, shown: str) -> bytes | None:
    try:
        return fileio.read_file(
            file_name, MAX_RECORD_BYTES, f"keystore {shown}", fileio.PRIVATE, dir_fd=dir_fd
        )
    except fileio.UntrustedFileError as exc:
        if exc.problem == fileio.MISSING:
            return None
        raise KeystoreError(str(exc)) from None


def bind_in(user_fd: int, account: Account) -> Account:
    """Write `account` as the record of the user directory `user_fd` unless one exists; the
    record now there (a concurrent request's may have won)."""
    if fileio.write_new(user_fd, ACCOUNT_FILE, account.encode(), 0o600):
        return account
    found = read_account(user_fd, account.uid)
    assert found is not None
    return found


def mismatch(account: Account, user: str | None) -> str | None:
    """Why a requester whose user name is `user` may not have `account`'s keys; None if it may."""
    uid = account.uid
    fix = (
        f"root: kmskeys-resolver stored retire --uid {uid} archives them and gives the uid's "
        "new account keys of its own (docs/dpapi.md)"
    )
    if account.retired is not None:
        return (
            f"the keys of uid {uid} belong to {account.describe()}, retired on "
            f"{_day(account.retired)}; they are kept for recovery only: {fix}"
        )
    if account.name == (user or ""):
        return None
    now = repr(user) if user else "no user name (its account was removed, or NSS fails)"
    return (
        f"the keys of uid {uid} belong to {account.describe()}, and uid {uid} now has {now}: an "
        f"account's keys are never handed to another holder of its uid; {fix}"
    )


class Accounts:
    """The account checks of the stored: backend, on the keystore `store`."""

    def __init__(self, store: Keystore) -> None:
        self.store = store

    def check(self, uid: int, user: str | None) -> None:
        """Refuse unless the uid's keys (if it has any) belong to the requester's account."""
        with self.store.opened((USER_DIR, str(uid))) as fd:
            if fd is None:
                return  # no keys yet: the first entry binds the account (bind())
            account = read_account(fd, uid)
            if account is None:  # a keystore from before accounts: bound to the user now
                account = bind_in(fd, new_account(uid, user))
        why = mismatch(account, user)
        if why is not None:
            raise AccountError(why)

    def bind(self, uid: int, user: str | None) -> None:
        """Make sure the uid's user directory has its account record (before a first entry)."""
        with self.store.opened((USER_DIR, str(uid)), create=True) as fd:
            assert fd is not None
            account = read_account(fd, uid) or bind_in(fd, new_account(uid, user))
        why = mismatch(account, user)
        if why is not None:  # bound to another account meanwhile
            raise AccountError(why)

    def status(self, uid: int, user: str | None) -> str:
        """What `NAME#account` answers: ok (the requester's, or no keys yet), other, retired."""
        with self.store.opened((USER_DIR, str(uid))) as fd:
            account = None if fd is None else read_account(fd, uid)
        if account is None or mismatch(account, user) is None:
            return STATUS_OK
        return STATUS_RETIRED if account.retired is not None else STATUS_OTHER


def unlink_record(user_fd: int) -> None:
    """Remove the account record and its retirement from a user directory (restore)."""
    for file_name in (RETIRED_FILE, ACCOUNT_FILE):
        try:
            os.unlink(file_name, dir_fd=user_fd)
        except FileNotFoundError:
            continue
    os.fsync(user_fd)
