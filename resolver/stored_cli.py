"""`kmskeys-resolver stored ...`: the keystore's admin commands (root, docs/dpapi.md).

- `create` makes version 1 of a name at the size root (or the policy) says: the way to give a
  machine-scope key a size other than the policy's, since no requester ever chooses it.
- `rotate` adds a version, which new protections use, and flushes every cached copy of the
  name's `#latest` host-wide (kmskeys.hostflush) so that the next protect, of any uid, uses it.
  Every older version stays, since rotation never deletes.
- `list` prints metadata only (name, scope, uid, version, size, seal, created), never a key;
  `accounts` the account each uid's keys belong to, and the retired ones.
- `retire` and `restore` (resolver/retire.py), `userdel-hook` (the USERDEL_CMD script).
- `migrate` moves a keystore of the flat layout of kmskeys 0.1 (resolver/keystore_migrate.py).
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from kmskeys.errors import InvalidNameError, KmsKeysError
from kmskeys.names import validate_name
from kmskeys.stored import KEY_SIZE_DEFAULT, SCOPE_MACHINE, SCOPE_USER
from resolver import config as config_mod
from resolver.accounts import Accounts, read_account
from resolver.backend import Timings
from resolver.errors import ResolverError
from resolver.gateway import UNMETERED
from resolver.keystore import EntryId, Keystore
from resolver.keystore_entry import RETIRED_DIR, USER_DIR
from resolver.retire import user_name
from resolver.stored import make_entry, parse_size, root_size

# A rotation runs from a shell, not under request-key: give a KMS seal time to answer.
ROTATE_DEADLINE = 30.0
MAX_RACES = 5


class RotateError(ResolverError):
    """`stored rotate` or `create` cannot proceed; the message says why and what to do."""


def _whose(config: config_mod.Config, name: str, uid: int | None, machine: bool) -> str:
    """NAME's scope, which must be the one the command names (--uid or --machine)."""
    scope = config.scope_for(name)
    asked = SCOPE_MACHINE if machine else SCOPE_USER if uid is not None else scope
    if asked != scope:
        raise RotateError(
            f"scope not allowed by policy: {name!r} is {scope}-scoped in {config.path}; "
            + ("give --machine" if scope == SCOPE_MACHINE else "give --uid U instead of --machine")
        )
    if scope == SCOPE_USER and uid is None:
        raise RotateError(f"{name!r} is user-scoped: say whose key with --uid U")
    return scope


def _add(config: config_mod.Config, store: Keystore, eid: EntryId, size: int) -> bool:
    """Store version eid of `size` bytes, made and sealed for root (no uid's bucket pays);
    False if a concurrent creator took that version."""
    deadline = time.monotonic() + ROTATE_DEADLINE
    entry, _key = make_entry(
        config, eid, size, budget=UNMETERED, deadline=deadline, timings=Timings()
    )
    return store.create(entry)[1]


def _target(
    config: config_mod.Config, name: str, uid: int | None, machine: bool
) -> tuple[str, str, int | None, Keystore]:
    """NAME validated, its scope, the owner uid of a user-scope key, and the keystore."""
    name = validate_name(name)
    scope = _whose(config, name, uid, machine)
    return name, scope, uid if scope == SCOPE_USER else None, Keystore(config.keystore_dir)


def create(
    config: config_mod.Config,
    name: str,
    *,
    uid: int | None = None,
    machine: bool = False,
    size: int | None = None,
) -> EntryId:
    """Make version 1 of (scope, NAME) at `size` (default: the policy's, else 32)."""
    name, scope, owner, store = _target(config, name, uid, machine)
    eid = EntryId(scope, owner, name, 1)
    kept = store.versions(scope, owner, name)
    if not kept:
        if uid is not None and scope == SCOPE_USER:
            Accounts(store).bind(uid, user_name(uid))
        if _add(config, store, eid, root_size(config, name, size, KEY_SIZE_DEFAULT)):
            return eid
        kept = store.versions(scope, owner, name)
    raise RotateError(
        f"{eid} exists already (versions {', '.join(map(str, kept))}); a key is never made "
        "again: kmskeys-resolver stored rotate adds a version"
    )


def rotate(
    config: config_mod.Config,
    name: str,
    *,
    uid: int | None = None,
    machine: bool = False,
    size: int | None = None,
) -> EntryId:
    """Add the next version of (scope, NAME) and return it; older versions stay."""
    name, scope, owner, store = _target(config, name, uid, machine)
    for _ in range(MAX_RACES):
        versions = store.versions(scope, owner, name)
        eid = EntryId(scope, owner, name, (versions[-1] if versions else 0) + 1)
        before = KEY_SIZE_DEFAULT
        if versions:
            # The newest entry must be intact: a rotation is no way around a damaged keystore.
            before = store.read(EntryId(scope, owner, name, versions[-1])).key_size
        # The policy's key_size wins (and refuses a --size against it); else as before.
        if _add(config, store, eid, root_size(config, name, size, before)):
            return eid
    raise RotateError(f"{name!r}: other rotations kept winning; run rotate again")


def _flush(config: config_mod.Config, name: str) -> str:
    """Flush NAME's cached keys host-wide (every uid's, and the host cache); what it did.

    A rotation makes exactly the cached `#latest` answers stale (a version's key never
    changes). flush_host(prefix, NAME) is root's `kmskeys flush NAME`; the `#latest` forms are
    flushed by their own descriptions too, so that this holds whether or not that flush
    reaches a name's qualified forms.
    """
    from kmskeys.hostflush import flush_host

    keys = uids = 0
    for form in (name, *(f"{name}{q}" for q in ("#latest", "#user#latest", "#machine#latest"))):
        flushed = flush_host(config.stored_prefix, form)
        keys, uids = keys + flushed.keys, max(uids, flushed.uids)
    return f"flushed {keys} cached key(s) of {uids} uid(s)"


def _uid(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user {text!r}") from None


def _size(text: str) -> int:
    try:
        return parse_size(text.encode())
    except ResolverError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None


def _when(stamp: int | None) -> str:
    if stamp is None:
        return "-"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def _list(config: config_mod.Config) -> int:
    rows: list[tuple[str, ...]] = [
        ("SCOPE", "UID", "NAME", "VERSION", "BYTES", "SEAL", "CREATED", "STATE")
    ]
    for listed in Keystore(config.keystore_dir).scan():
        eid, entry = listed.id, listed.entry
        rows.append(
            (
                eid.scope,
                "-" if eid.uid is None else str(eid.uid),
                eid.name,
                str(eid.version),
                str(entry.key_size) if entry else "-",
                entry.seal if entry else "-",
                _when(entry.created if entry else None),
                "ok" if listed.problem is None else f"REFUSED: {listed.problem}",
            )
        )
    if len(rows) == 1:
        print(f"keystore {config.keystore_dir} holds no keys yet")
        return 0
    _table(rows)
    return 0


def _accounts(config: config_mod.Config) -> int:
    """Each uid's account, and the retired ones: whose keys they are, never a key."""
    store = Keystore(config.keystore_dir)
    rows: list[tuple[str, ...]] = [("UID", "USER", "ACCOUNT", "BOUND", "STATE")]
    places = [(USER_DIR,)] + [(RETIRED_DIR, str(uid)) for uid in _numbers(store, (RETIRED_DIR,))]
    for place in places:
        with store.opened(place) as parent:
            if parent is None:
                continue
            for part in sorted(os.listdir(parent)):
                uid = int(place[1]) if len(place) > 1 else int(part) if part.isdigit() else None
                fd = store.open_dir(parent, part, "/".join((*place, part)), create=False)
                if uid is None or fd is None:
                    continue
                try:
                    account = read_account(fd, uid)
                finally:
                    os.close(fd)
                rows.append(_account_row(uid, account, "/".join((*place, part))))
    if len(rows) == 1:
        print(f"keystore {config.keystore_dir} holds no user keys yet")
        return 0
    _table(rows)
    return 0


def _numbers(store: Keystore, place: tuple[str, ...]) -> list[int]:
    with store.opened(place) as fd:
        names = [] if fd is None else os.listdir(fd)
    return sorted(int(n) for n in names if n.isascii() and n.isdigit())


def _account_row(uid: int, account: object, where: str) -> tuple[str, ...]:
    from resolver.accounts import Account, mismatch

    if not isinstance(account, Account):
        return (str(uid), "-", "-", "-", f"unbound ({where}): bound on the uid's next request")
    now = user_name(uid)
    if account.retired is not None:
        state = f"retired {_when(account.retired)} ({where})"
    elif mismatch(account, now):
        state = f"REFUSED: uid {uid} is now {now or 'nameless'}; retire it"
    else:
        state = "active"
    return (str(uid), account.name or "-", account.ident.hex(), _when(account.created), state)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmskeys-resolver stored", description="The stored: keystore's admin commands (root)."
    )
    parser.add_argument("--config", type=Path, default=config_mod.DEFAULT_PATH)
    commands = parser.add_subparsers(dest="command", required=True)
    for command, what in (
        ("create", "make version 1 of NAME at a size of root's choosing"),
        ("rotate", "add a new version of NAME's key, then flush its cached #latest"),
    ):
        sub = commands.add_parser(command, help=what)
        sub.add_argument("name", metavar="NAME")
        whose = sub.add_mutually_exclusive_group()
        whose.add_argument("--uid", type=_uid, help="the user whose key it is (user scope)")
        whose.add_argument("--machine", action="store_true", help="the host's key")
        sub.add_argument("--size", type=_size, help="bytes of the key (default: policy, or 32)")
    commands.add_parser("list", help="metadata of every stored key, never the keys")
    commands.add_parser("accounts", help="whose account each uid's keys belong to")
    commands.add_parser("migrate", help="move a keystore of the kmskeys 0.1 layout")
    retire = commands.add_parser("retire", help="retire an account's keys (kept, unusable)")
    who = retire.add_mutually_exclusive_group(required=True)
    who.add_argument("--uid", type=_uid, help="the uid whose keys are retired")
    who.add_argument("--user", type=_uid, dest="uid", help="the same, by user name (the hook)")
    restore = commands.add_parser("restore", help="give a retired account's keys back")
    restore.add_argument("--uid", type=_uid, required=True)
    restore.add_argument("account", metavar="ACCOUNT", help="its id, as `stored accounts` shows")
    hook = commands.add_parser("userdel-hook", help="the USERDEL_CMD script that calls retire")
    hook.add_argument("--write", type=Path, metavar="PATH", help="install it there (0755)")
    for sub in commands.choices.values():
        sub.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    return parser


def _run(config: config_mod.Config, args: argparse.Namespace) -> int:
    command = args.command
    store = Keystore(config.keystore_dir)
    if command == "list":
        return _list(config)
    if command == "accounts":
        return _accounts(config)
    if command == "migrate":
        from resolver.keystore_migrate import migrate_all

        names, entries = migrate_all(store)
        print(f"keystore {config.keystore_dir}: moved {entries} entries of {names} names")
        return 0
    if command in ("retire", "restore", "userdel-hook"):
        return _accounts_command(config, store, args)
    make = create if command == "create" else rotate
    eid = make(config, args.name, uid=args.uid, machine=args.machine, size=args.size)
    if command == "create":
        print(f"{eid}: created")
        return 0
    older = "version 1 stays" if eid.version == 2 else f"versions 1-{eid.version - 1} stay"
    kept = f"; {older} available" if eid.version > 1 else ""
    print(f"{eid}: created{kept}; new protections use version {eid.version}")
    try:
        print(f"{eid.name}: {_flush(config, eid.name)}")
    except (OSError, KmsKeysError) as exc:
        print(
            f"kmskeys-resolver stored rotate: {eid} was created, but the flush failed ({exc}): "
            f"cached copies use version {eid.version - 1} until they expire; run kmskeys flush",
            file=sys.stderr,
        )
        return 1
    return 0


def _accounts_command(config: config_mod.Config, store: Keystore, args: argparse.Namespace) -> int:
    from resolver import retire as retire_mod

    if args.command == "userdel-hook":
        from kmskeys import fileio
        from resolver.install import resolver_executable

        script = retire_mod.userdel_hook(resolver_executable(), args.config)
        if args.write is None:
            print(script, end="")
            return 0
        fileio.write_atomic(args.write, script.encode(), 0o755)
        print(f"wrote {args.write}; enable it with `USERDEL_CMD {args.write}` in /etc/login.defs")
        return 0
    if args.command == "restore":
        account = retire_mod.restore(store, args.uid, args.account)
        print(f"uid {args.uid}: the keys of account {account.ident.hex()} are {account.name!r}'s")
        return 0
    done = retire_mod.retire(store, args.uid)
    if done.account is None:
        flushed = f"{done.flushed} cached key(s) flushed"
        print(f"uid {args.uid} has no user keys: nothing retired ({flushed})")
        return 0
    print(
        f"uid {args.uid}: the keys of {done.account.describe()} are retired, kept in "
        f"{config.keystore_dir}/{done.where}; {done.flushed} cached key(s) flushed"
    )
    return 0


def main(argv: Sequence[str]) -> int:
    """`kmskeys-resolver stored ...`."""
    args = _parser().parse_args(argv)
    prog = f"kmskeys-resolver stored {args.command}"
    if os.geteuid() != 0:
        print(f"{prog}: must run as root (the keystore is root's alone)", file=sys.stderr)
        return 1
    try:
        return _run(config_mod.load(args.config), args)
    except (ResolverError, InvalidNameError, OSError) as exc:
        print(f"{prog}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
