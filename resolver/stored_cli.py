"""`kmskeys-resolver stored rotate | list`: the keystore's admin commands (root, docs/dpapi.md).

`rotate` adds a version, which new protections use; every older version stays, since rotation
never deletes. `list` prints metadata only (name, scope, uid, version, size, seal, created),
never a key.
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

from kmskeys.errors import InvalidNameError
from kmskeys.names import validate_name
from kmskeys.stored import KEY_SIZE_DEFAULT, SCOPE_MACHINE, SCOPE_USER
from resolver import config as config_mod
from resolver.backend import Timings
from resolver.errors import ResolverError
from resolver.gateway import UNMETERED
from resolver.keystore import EntryId, Keystore
from resolver.stored import make_entry, parse_size

# A rotation runs from a shell, not under request-key: give a KMS seal time to answer.
ROTATE_DEADLINE = 30.0
MAX_RACES = 5


class RotateError(ResolverError):
    """`stored rotate` cannot proceed; the message says why and what to do."""


def rotate(
    config: config_mod.Config,
    name: str,
    *,
    uid: int | None = None,
    machine: bool = False,
    size: int | None = None,
) -> EntryId:
    """Add the next version of (scope, NAME) and return it; older versions stay."""
    name = validate_name(name)
    scope = config.scope_for(name)
    asked = SCOPE_MACHINE if machine else SCOPE_USER if uid is not None else scope
    if asked != scope:
        raise RotateError(
            f"scope not allowed by policy: {name!r} is {scope}-scoped in {config.path}; "
            + ("give --machine" if scope == SCOPE_MACHINE else "give --uid U instead of --machine")
        )
    if scope == SCOPE_USER and uid is None:
        raise RotateError(f"{name!r} is user-scoped: say whose key with --uid U")
    store = Keystore(config.keystore_dir)
    deadline = time.monotonic() + ROTATE_DEADLINE
    for _ in range(MAX_RACES):
        versions = store.versions(scope, uid, name)
        if versions:
            # The newest entry must be intact: a rotation is no way around a damaged keystore.
            latest = store.read(EntryId(scope, uid, name, versions[-1]))
            size = size or latest.key_size
        eid = EntryId(scope, uid, name, (versions[-1] if versions else 0) + 1)
        # root's own command: no uid's bucket pays for its seal call.
        entry, _key = make_entry(
            config,
            eid,
            size or KEY_SIZE_DEFAULT,
            budget=UNMETERED,
            deadline=deadline,
            timings=Timings(),
        )
        stored, ours = store.create(entry)
        if ours:
            return stored.id
    raise RotateError(f"{name!r}: other rotations kept winning; run rotate again")


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


def _list(config: config_mod.Config) -> int:
    rows = [("SCOPE", "UID", "NAME", "VERSION", "BYTES", "SEAL", "CREATED", "STATE")]
    for listed in Keystore(config.keystore_dir).scan():
        eid, entry = listed.id, listed.entry
        created = (
            datetime.fromtimestamp(entry.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if entry
            else "-"
        )
        rows.append(
            (
                eid.scope,
                "-" if eid.uid is None else str(eid.uid),
                eid.name,
                str(eid.version),
                str(entry.key_size) if entry else "-",
                entry.seal if entry else "-",
                created,
                "ok" if listed.problem is None else f"REFUSED: {listed.problem}",
            )
        )
    if len(rows) == 1:
        print(f"keystore {config.keystore_dir} holds no keys yet")
        return 0
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
    return 0


def main(argv: Sequence[str]) -> int:
    """`kmskeys-resolver stored ...`."""
    parser = argparse.ArgumentParser(
        prog="kmskeys-resolver stored", description="Rotate or list the stored: keystore (root)."
    )
    parser.add_argument("--config", type=Path, default=config_mod.DEFAULT_PATH)
    commands = parser.add_subparsers(dest="command", required=True)
    rot = commands.add_parser("rotate", help="add a new version of NAME's key")
    rot.add_argument("name", metavar="NAME")
    whose = rot.add_mutually_exclusive_group()
    whose.add_argument("--uid", type=_uid, help="the user whose key rotates (user scope)")
    whose.add_argument("--machine", action="store_true", help="the host's key (machine scope)")
    rot.add_argument("--size", type=_size, help="bytes of the new key (default: as before)")
    listing = commands.add_parser("list", help="metadata of every stored key, never the keys")
    listing.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    rot.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    prog = f"kmskeys-resolver stored {args.command}"
    if os.geteuid() != 0:
        print(f"{prog}: must run as root (the keystore is root's alone)", file=sys.stderr)
        return 1
    try:
        config = config_mod.load(args.config)
        if args.command == "list":
            return _list(config)
        eid = rotate(config, args.name, uid=args.uid, machine=args.machine, size=args.size)
    except (ResolverError, InvalidNameError, OSError) as exc:
        print(f"{prog}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    older = "version 1 stays" if eid.version == 2 else f"versions 1-{eid.version - 1} stay"
    kept = f"; {older} available" if eid.version > 1 else ""
    print(f"{eid}: created{kept}; new protections use version {eid.version}")
    return 0
