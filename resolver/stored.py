"""The `stored:` backend: a random key per (scope, NAME), made once and kept in the keystore.

The essay's `storedresolver`, made real: `keyctl request2 user stored:NAME 32` returns 32 random
bytes, and the same bytes after the key is unlinked, the keyrings cleared or the host rebooted.
The callout is the key size (16..4096, empty for 32); the description's qualifier
(kmskeys.stored) asserts a scope and picks a version, `latest` or the policy's `scope`. The
handler has already applied `allow_users`; the scope comes from `[stored."GLOB"]` alone, and a
user-scope key is the key of the kernel's %u, never of anything the requester says.
"""

from __future__ import annotations

import os
import time

from kmskeys.errors import InvalidNameError
from kmskeys.stored import (
    KEY_SIZE_DEFAULT,
    KEY_SIZE_MAX,
    KEY_SIZE_MIN,
    SCOPE_USER,
    StoredQuery,
    parse_qualifier,
)
from resolver.backend import Budget, Context, Request, Result, Timings
from resolver.config import Config
from resolver.errors import KeystoreError, RefusedError, UnknownSecretError
from resolver.keystore import SEAL_KMS, SEAL_NONE, SEAL_PKCS11, Entry, EntryId, Keystore


def parse_size(callout: bytes) -> int:
    """The key size a `stored:` callout asks for; RefusedError unless 16..4096 (empty: 32)."""
    if not callout:
        return KEY_SIZE_DEFAULT
    text = callout.decode("ascii", "replace")
    if text.isascii() and text.isdigit() and text[0] != "0" and len(text) <= 4:
        size = int(text)
        if KEY_SIZE_MIN <= size <= KEY_SIZE_MAX:
            return size
    raise RefusedError(
        f"bad size {text[:16]!r}: the callout is the key size, "
        f"a whole number of bytes from {KEY_SIZE_MIN} to {KEY_SIZE_MAX} (empty for 32)"
    )


class StoredBackend:
    """Serves `stored:` requests from the keystore, creating version 1 on the first request."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Keystore(config.keystore_dir)

    def resolve(self, request: Request, context: Context) -> Result:
        """The key (or version number, or scope) the request's description names."""
        try:
            query = parse_qualifier(request.qualifier)
        except InvalidNameError as exc:
            raise RefusedError(str(exc)) from None
        size = parse_size(request.callout)
        scope = self.config.scope_for(request.name)
        notes = context.notes
        notes["source"] = "keystore"
        if query.kind == StoredQuery.SCOPE:
            notes["mode"] = "scope"
            return Result(scope.encode(), details=notes)
        if query.scope is not None and query.scope != scope:
            raise RefusedError(
                f"scope not allowed by policy: {request.name!r} is {scope}-scoped here, "
                f"the request asks for {query.scope}"
            )
        uid = request.uid if scope == SCOPE_USER else None
        if query.kind == StoredQuery.LATEST:
            entry = self._latest(scope, uid, request.name, size, context)
            notes["mode"] = f"{scope}.latest"
            return Result(str(entry.id.version).encode(), details=notes)
        eid = EntryId(scope, uid, request.name, query.version)
        entry, key = self._entry(eid, size, context)
        self._check_size(entry, size)
        notes["mode"] = f"{scope}.v{entry.id.version}" + (
            "" if entry.seal == SEAL_NONE else ".sealed"
        )
        if key is None:
            key = self._unseal(entry, context)
        return Result(key, details=notes)

    def _latest(self, scope: str, uid: int | None, name: str, size: int, context: Context) -> Entry:
        versions = self.store.versions(scope, uid, name)
        if versions:
            entry = self.store.read(EntryId(scope, uid, name, versions[-1]))
        else:
            entry, _ = self._first(EntryId(scope, uid, name, 1), size, context)
        self._check_size(entry, size)
        return entry

    def _entry(self, eid: EntryId, size: int, context: Context) -> tuple[Entry, bytes | None]:
        """The entry `eid`, made now if it is version 1 and none exists (with its key)."""
        try:
            return self.store.read(eid), None
        except UnknownSecretError:
            pass
        versions = self.store.versions(eid.scope, eid.uid, eid.name)
        if eid.version in versions:  # a concurrent request created it since we looked
            return self.store.read(eid), None
        if eid.version != 1:
            raise UnknownSecretError(
                f"no version {eid.version} of {eid.name!r} ({eid.scope} scope"
                f"{'' if eid.uid is None else f', uid {eid.uid}'}); versions kept: "
                f"{', '.join(map(str, versions)) or 'none'}"
            )
        if versions:
            raise KeystoreError(
                f"keystore entry {eid} is missing while later versions exist; it is never "
                "recreated: restore it from a backup"
            )
        return self._first(eid, size, context)

    def _check_size(self, entry: Entry, size: int) -> None:
        if entry.key_size != size:
            raise RefusedError(
                f"bad size: stored key {entry.id} is {entry.key_size} bytes, the request asks "
                f"for {size}; a stored key is never recreated, so ask for {entry.key_size}"
            )

    def _first(self, eid: EntryId, size: int, context: Context) -> tuple[Entry, bytes | None]:
        """Create `eid` unless a concurrent request did; the entry kept, and its key if ours."""
        entry, key = make_entry(
            self.config,
            eid,
            size,
            budget=context.budget,
            deadline=context.deadline,
            timings=context.timings,
        )
        stored, ours = self.store.create(entry)
        if ours:
            context.notes["source"] = "keystore-new"
            return stored, key
        return stored, None

    def _unseal(self, entry: Entry, context: Context) -> bytes:
        if entry.seal == SEAL_NONE:
            return entry.material
        if entry.seal == SEAL_PKCS11:
            from resolver.tokenseal import TokenSeal

            sealer = TokenSeal(self.config, context.budget, context.deadline, context.timings)
            return sealer.unseal(entry)
        from resolver.seal import KmsSeal

        seal = KmsSeal(self.config, context.budget, context.deadline, context.timings)
        return seal.unseal(entry)


def make_entry(
    config: Config, eid: EntryId, size: int, *, budget: Budget, deadline: float, timings: Timings
) -> tuple[Entry, bytes]:
    """A new entry with a fresh random key (sealed if the config says so, an AWS call that
    `budget` pays for), and that key."""
    key = os.urandom(size)
    if config.seal == SEAL_KMS:
        from resolver.seal import KmsSeal

        material = KmsSeal(config, budget, deadline, timings).seal(eid, key)
        arn = config.seal_key_arn or ""
    elif config.seal == SEAL_PKCS11:
        from resolver.tokenseal import TokenSeal

        material, arn = TokenSeal(config, budget, deadline, timings).seal(eid, key)
    else:
        material, arn = key, ""
    return Entry(eid, int(time.time()), size, config.seal, material, arn), key
