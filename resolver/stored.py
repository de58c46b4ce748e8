"""The `stored:` backend: a random key per (scope, NAME), made once and kept in the keystore.

The essay's `storedresolver`, made real: `keyctl request2 user stored:NAME 32` returns 32 random
bytes, and the same bytes after the key is unlinked, the keyrings cleared or the host rebooted.
The callout is the key size (16..4096, empty for 32); the description's qualifier
(kmskeys.stored) asserts a scope and picks a version, `latest` or the policy's `scope`. The
handler has already applied `allow_users`; the scope comes from `[stored."GLOB"]` alone, and a
user-scope key is the key of the kernel's %u, never of anything the requester says, and only
while the uid is the account its keys were bound to (resolver/accounts.py).

A new entry is made only for a request that will be answered, and only within the requester's
means (resolver/charges.py): its uid's cap on entries and bytes, its key quota and a token of its
bucket. Its size is never the requester's to choose for others: a machine-scope key is made at
the policy's `key_size` (32 bytes without one) or by root's `stored create`; a user-scope key at
the policy's `key_size`, else at the size its own user's first request asks for, since only
that user ever uses it.
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
from resolver.accounts import Accounts
from resolver.backend import Budget, Context, Request, Result, Timings
from resolver.charges import Ledger, check_quota
from resolver.config import Config
from resolver.errors import KeystoreError, RefusedError, UnknownSecretError
from resolver.keystore import SEAL_KMS, SEAL_NONE, SEAL_PKCS11, Entry, EntryId, Keystore
from resolver.keystore_entry import RETIRED_DIR
from resolver.limits import charged_uid


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
        self.accounts = Accounts(self.store)

    def resolve(self, request: Request, context: Context) -> Result:
        """The key (or version number, scope or account standing) the description names."""
        try:
            query = parse_qualifier(request.qualifier)
        except InvalidNameError as exc:
            raise RefusedError(str(exc)) from None
        size = parse_size(request.callout)
        scope = self.config.scope_for(request.name)
        notes = context.notes
        notes["source"] = "keystore"
        if query.kind in (StoredQuery.SCOPE, StoredQuery.ACCOUNT):
            return self._about(query.kind, scope, request, notes)
        if query.scope is not None and query.scope != scope:
            raise RefusedError(
                f"scope not allowed by policy: {request.name!r} is {scope}-scoped here, "
                f"the request asks for {query.scope}"
            )
        uid = request.uid if scope == SCOPE_USER else None
        if scope == SCOPE_USER:
            self.accounts.check(request.uid, request.user)
        if query.kind == StoredQuery.LATEST:
            entry = self._latest(EntryId(scope, uid, request.name, 1), size, request, context)
            notes["mode"] = f"{scope}.latest"
            return Result(str(entry.id.version).encode(), details=notes)
        eid = EntryId(scope, uid, request.name, query.version)
        entry, key = self._entry(eid, size, request, context, create=not query.explicit)
        self._check_size(entry, size)
        notes["mode"] = f"{scope}.v{entry.id.version}" + (
            "" if entry.seal == SEAL_NONE else ".sealed"
        )
        if key is None:
            key = self._unseal(entry, context)
        return Result(key, details=notes)

    def _about(self, kind: str, scope: str, request: Request, notes: dict[str, str]) -> Result:
        """`#scope` (the policy's scope for NAME) or `#account` (the requester's standing)."""
        notes["mode"] = kind
        if kind == StoredQuery.SCOPE:
            return Result(scope.encode(), details=notes)
        status = self.accounts.status(request.uid, request.user)
        # A standing changes when root retires an account: cached as briefly as a refusal.
        return Result(status.encode(), ttl=self.config.negative_ttl, details=notes)

    def _latest(self, first: EntryId, size: int, request: Request, context: Context) -> Entry:
        versions = self.store.versions(first.scope, first.uid, first.name)
        if versions:
            entry = self.store.read(EntryId(first.scope, first.uid, first.name, versions[-1]))
        else:
            # The answer is the version number: one byte of the requester's quota.
            entry, _ = self._first(first, size, request, context, payload=1)
        self._check_size(entry, size)
        return entry

    def _entry(
        self, eid: EntryId, size: int, request: Request, context: Context, *, create: bool
    ) -> tuple[Entry, bytes | None]:
        """The entry `eid`, made now if it is version 1, none exists and `create` (with its
        key)."""
        try:
            return self.store.read(eid), None
        except UnknownSecretError:
            pass
        versions = self.store.versions(eid.scope, eid.uid, eid.name)
        if eid.version in versions:  # a concurrent request created it since we looked
            return self.store.read(eid), None
        if eid.version != 1 or not create:
            raise UnknownSecretError(self._unknown(eid, versions))
        if versions:
            raise KeystoreError(
                f"keystore entry {eid} is missing while later versions exist; it is never "
                "recreated: restore it from a backup"
            )
        return self._first(eid, size, request, context, payload=size)

    def _unknown(self, eid: EntryId, versions: list[int]) -> str:
        kept = ", ".join(map(str, versions)) or "none"
        owner = "" if eid.uid is None else f", uid {eid.uid}"
        why = f"no version {eid.version} of {eid.name!r} ({eid.scope} scope{owner})"
        why += f"; versions kept: {kept}"
        if eid.version == 1:
            why += "; a #vN request never makes a key"
        if eid.uid is not None:
            with self.store.opened((RETIRED_DIR, str(eid.uid))) as retired:
                if retired is not None:
                    why += (
                        f"; uid {eid.uid} had an earlier account whose keys were retired: what it "
                        "protected opens only with those (kmskeys-resolver stored accounts)"
                    )
        return why

    def _check_size(self, entry: Entry, size: int) -> None:
        if entry.key_size != size:
            raise RefusedError(
                f"bad size: stored key {entry.id} is {entry.key_size} bytes, the request asks "
                f"for {size}; a stored key is never recreated, so ask for {entry.key_size}"
            )

    def _first(
        self, eid: EntryId, asked: int, request: Request, context: Context, *, payload: int
    ) -> tuple[Entry, bytes | None]:
        """Create `eid` unless a concurrent request did; the entry kept, and its key if ours.

        Every check that can refuse comes before anything is written: the size, the uid's cap,
        the requester's key quota (room for `payload`, the answer), its bucket.
        """
        config = self.config
        size = made_size(config, eid, asked)
        # The cap is the charged uid's: a /etc/subuid range shares its owner's (limits.py).
        charged = charged_uid(config, request.uid)
        ledger = Ledger(
            self.store, charged, config.keystore_entries_per_uid, config.keystore_bytes_per_uid
        )
        ledger.check(len(Entry(eid, 0, size, SEAL_NONE, bytes(size)).encode()))
        check_quota(request.uid, payload)
        if config.seal == SEAL_NONE:
            # The creation's token; a sealed creation spends its seal's (the KMS Encrypt, or the
            # token's public-key read), so that every new entry costs exactly one.
            context.budget.spend()
        if eid.scope == SCOPE_USER:
            self.accounts.bind(request.uid, request.user)
        entry, key = make_entry(
            config,
            eid,
            size,
            budget=context.budget,
            deadline=context.deadline,
            timings=context.timings,
        )
        stored, ours = self.store.create(entry, ledger)
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


def policy_size(config: Config, name: str) -> tuple[int, str] | None:
    """The policy's `key_size` for NAME, and where it says so; None when it sets none."""
    rule = config.rule_for(name, config.stored_prefix)
    if rule is None or rule.key_size is None:
        return None
    return rule.key_size, f'policy [stored."{rule.pattern}"] key_size'


def made_size(config: Config, eid: EntryId, asked: int) -> int:
    """The size a requester's new entry `eid` is made at: the policy's `key_size`; else 32 for
    machine scope, or what the key's own user asks (`asked`) for user scope. A request for
    another size is refused before anything is made."""
    policy = policy_size(config, eid.name)
    if policy is None and eid.scope == SCOPE_USER:
        return asked
    made, why = policy or (
        KEY_SIZE_DEFAULT,
        "the default for machine scope without a policy key_size",
    )
    if asked != made:
        raise RefusedError(
            f"bad size: {eid.scope}-scope key {eid.name!r} is made {made} bytes here ({why}), "
            f"the request asks for {asked}; no requester chooses the size of a key: ask for "
            f"{made}, or root makes it with kmskeys-resolver stored create --size"
        )
    return made


def root_size(config: Config, name: str, asked: int | None, fallback: int) -> int:
    """The size of a key root's `stored create` or `rotate` makes: the policy's `key_size`
    (refusing another `asked`), else `asked`, else `fallback`."""
    policy = policy_size(config, name)
    if policy is None:
        return fallback if asked is None else asked
    if asked is not None and asked != policy[0]:
        raise RefusedError(
            f"--size {asked}: {name!r} is {policy[0]} bytes by {policy[1]}; change the policy, "
            "or leave out --size"
        )
    return policy[0]


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
