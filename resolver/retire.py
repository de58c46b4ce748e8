"""Retiring an account's keys: `kmskeys-resolver stored retire`, `restore` and the userdel hook.

**Retire** means kept, unusable and out of the way, never deleted: the account is marked retired
(`user/UID/.retired`, written once), then its whole directory moves to `retired/UID/ACCOUNT`
(one rename), its charges are dropped and every key the resolver made for the uid is invalidated
in the kernel (a cached copy must not outlive the account either: the uid's next holder would
own it). The uid's next account starts with no keys and gets new ones; the retired ones serve
nobody. Root can `restore` them (a userdel by mistake) or delete the directory once nothing
protected under them is needed: what was protected under a deleted key is lost for good.

**The userdel hook.** shadow's `userdel` runs the command `USERDEL_CMD` of /etc/login.defs with
the user name as its only argument before it removes the account, and ignores its exit status
(login.defs(5)); `userdel_hook()` is the script for it, `stored userdel-hook --write` installs it.
"""

from __future__ import annotations

import os
import pwd
import shlex
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from kmskeys import fileio, keyutils, prockeys
from kmskeys.errors import KeyctlError
from kmskeys.hostflush import admin_gid
from resolver.accounts import (
    RETIRED_FILE,
    Account,
    bind_in,
    new_account,
    read_account,
    unlink_record,
)
from resolver.charges import CHARGES_DIR
from resolver.errors import ResolverError
from resolver.keystore import Keystore
from resolver.keystore_entry import RETIRED_DIR, USER_DIR, write_error

HOOK_PATH = Path("/usr/local/sbin/kmskeys-userdel")


class RetireError(ResolverError):
    """`stored retire` or `restore` cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class Retired:
    """What a retirement did: the account (None: the uid had no keys), where its keys went
    below keystore_dir, and how many cached kernel keys of the uid it invalidated."""

    account: Account | None
    where: str
    flushed: int


def user_name(uid: int) -> str | None:
    """The passwd name of `uid` now, or None."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def retire(store: Keystore, uid: int) -> Retired:
    """Retire uid's user-scope keys (see the module docstring); safe to run again after a crash."""
    account, where = None, ""
    try:
        with store.opened((USER_DIR,)) as users:
            account = None if users is None else _mark_retired(store, users, uid)
            if users is not None and account is not None:
                where = f"{RETIRED_DIR}/{uid}/{account.ident.hex()}"
                with store.opened((RETIRED_DIR, str(uid)), create=True) as dest:
                    assert dest is not None
                    os.rename(str(uid), account.ident.hex(), src_dir_fd=users, dst_dir_fd=dest)
                    os.fsync(dest)
                os.fsync(users)
        _drop_charges(store, uid)
    except OSError as exc:
        raise write_error(exc, store.root) from None
    return Retired(account, where, flush_uid(uid))


def _mark_retired(store: Keystore, users: int, uid: int) -> Account | None:
    fd = store.open_dir(users, str(uid), f"{USER_DIR}/{uid}", create=False)
    if fd is None:
        return None
    try:
        account = read_account(fd, uid) or bind_in(fd, new_account(uid, user_name(uid)))
        if account.retired is None:
            when = int(time.time())
            fileio.write_new(fd, RETIRED_FILE, account.retired_marker(when), 0o600)
            account = replace(account, retired=when)
        return account
    finally:
        os.close(fd)


def _drop_charges(store: Keystore, uid: int) -> None:
    # The uid's next account starts from zero; machine-scope keys the old one created stay,
    # charged to nobody.
    with store.opened((CHARGES_DIR,)) as charges:
        if charges is not None:
            try:
                os.unlink(str(uid), dir_fd=charges)
            except FileNotFoundError:
                return
            os.fsync(charges)


def restore(store: Keystore, uid: int, ident: str) -> Account:
    """Give the retired account `ident` of `uid` back to the uid's user now (root's decision)."""
    with store.opened((USER_DIR,), create=True) as users:
        assert users is not None
        current = store.open_dir(users, str(uid), f"{USER_DIR}/{uid}", create=False)
        if current is not None:
            os.close(current)
            raise RetireError(
                f"uid {uid} has keys of its own now ({USER_DIR}/{uid}): retire them first"
            )
        with store.opened((RETIRED_DIR, str(uid))) as parent:
            fd = None if parent is None else store.open_dir(parent, ident, ident, create=False)
            if parent is None or fd is None:
                raise RetireError(
                    f"uid {uid} has no retired account {ident!r}: kmskeys-resolver stored "
                    "accounts lists them"
                )
            try:
                old = read_account(fd, uid)
                if old is None or old.ident.hex() != ident:
                    raise RetireError(
                        f"{RETIRED_DIR}/{uid}/{ident} holds no record of that account"
                    )
                unlink_record(fd)
                account = bind_in(fd, replace(old, name=user_name(uid) or "", retired=None))
            finally:
                os.close(fd)
            os.rename(ident, str(uid), src_dir_fd=parent, dst_dir_fd=users)
            os.fsync(users)
            os.fsync(parent)
    return account


def flush_uid(uid: int) -> int:
    """Invalidate every key the resolver made for `uid`, wherever it is cached; how many.

    As root's `kmskeys flush` does (kmskeys/hostflush.py), with the admin group as fsgid, in a
    thread of its own (the fsgid is per thread). Each serial from /proc/keys is confirmed with
    keyctl_describe first: a description may hold a newline and forge a line.
    """
    gid = admin_gid()
    if gid is None:
        return 0
    found: list[int | BaseException] = []

    def run() -> None:
        try:
            found.append(_flush_uid(uid, gid))
        except BaseException as exc:  # re-raised in the caller's thread
            found.append(exc)

    worker = threading.Thread(target=run, name="kmskeys-retire-flush")
    worker.start()
    worker.join()
    if isinstance(found[0], BaseException):
        raise found[0]
    return found[0]


def _flush_uid(uid: int, gid: int) -> int:
    previous = keyutils.set_fsgid(gid)
    try:
        if keyutils.current_fsgid() != gid:
            raise PermissionError(f"cannot take the admin group (gid {gid}): not root?")
        count = 0
        # Lines of /proc/keys confirmed by keyctl_describe (kmskeys/prockeys.py), checked again
        # below for what this flush needs.
        found = prockeys.keys(lambda key: (key.type, key.uid, key.gid) == ("user", uid, gid))
        for key in found.values():
            try:
                described = keyutils.keyctl_describe_alloc(key.serial).split(b";", 4)
                if described[:3] != [b"user", str(uid).encode(), str(gid).encode()]:
                    continue  # a forged line, or the serial now names another key
                keyutils.keyctl_invalidate(key.serial)
            except KeyctlError:
                continue  # expired, negative or gone meanwhile
            count += 1
        return count
    finally:
        keyutils.set_fsgid(previous)


def userdel_hook(resolver: Path, config: Path) -> str:
    """The USERDEL_CMD script that retires the keys of the user userdel removes."""
    command = f"{shlex.quote(str(resolver))} stored --config {shlex.quote(str(config))}"
    return f"""#!/bin/sh
# kmskeys: retire the stored: keys of the user being removed (docs/dpapi.md).
# Enable with `USERDEL_CMD {HOOK_PATH}` in /etc/login.defs. userdel runs it with the user name
# as its one argument before it removes the account, and ignores its exit status.
[ "$#" -eq 1 ] || {{ echo "usage: $0 USER" >&2; exit 2; }}
exec {command} retire --user "$1"
"""
