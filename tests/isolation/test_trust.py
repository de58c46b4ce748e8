"""The trust model through the real upcall: a cached secret answers to its owner's uid, never to
whoever shares a keyring with it (docs/security.md).

Each test reproduces one finding of the security review, under every kind of requester this
session runs (tests/support/requester.py):

- F1: a named session keyring squatted by another user;
- F2: `runuser -u A` / non-login `su`, which keep root's session keyring;
- co-possessors tampering with a key (update, setperm, revoke, invalidate, timeout);
- F4: one uid flooding the host with upcalls.
"""

from __future__ import annotations

import errno
import pwd
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kmskeys import (
    Key,
    KeyOwnershipError,
    KeyPermissionError,
    Keyring,
    KmsKeysError,
    get_secret,
    keyutils,
    lowlevel,
)
from kmskeys.contract import ADMIN_KEY_PERM, ADMIN_NEGATIVE_KEY_PERM
from tests.support.kms_proxy import ProxiedRequest
from tests.support.names import unique
from tests.support.requester import Requester, as_user
from tests.upcall.harness import Install, installed

pytestmark = pytest.mark.isolation

User = pwd.struct_passwd
OPEN = 0x3F3F3F3F  # every permission for everyone: what a squatter sets
PLANTED = b"kmst-planted-by-another-user"
DENIED = {"error": "KeyPermissionError", "errno": errno.EACCES}


def _attempt(func: Callable[[], object]) -> object:
    """func()'s result, or the error class and errno it raised (JSON-able)."""
    try:
        return {"ok": func()}
    except KmsKeysError as exc:
        return {"error": type(exc).__name__, "errno": exc.errno}


def _foreign(func: Callable[[], object]) -> object:
    """func()'s result, or for a KeyOwnershipError the owner it names."""
    try:
        return {"ok": func()}
    except KeyOwnershipError as exc:
        return {"foreign": exc.owner}


def _denial(func: Callable[[], object]) -> object:
    """For a KeyPermissionError: whether it came with the guidance to use a keyring of one's own."""
    try:
        func()
    except KeyPermissionError as exc:
        return {"denied": True, "guidance": "session keyring of your own" in str(exc)}
    return {"denied": False}


def _raw_join(name: str) -> int:
    # What `keyctl session NAME` does: join (or create) the named keyring, no questions asked.
    return keyutils.keyctl_join_session_keyring(name.encode())


def test_a_squatted_named_keyring_leaks_nothing(
    users: tuple[User, User], iso: Install, requester: Requester
) -> None:
    a, b = users
    ring_name, name, mine = unique("squat"), unique("planted"), unique("mine")
    blob_planted, blob_mine = iso.blob(b"kmst-real", name), iso.blob(b"kmst-root-only", mine)

    def squat() -> int:
        ring = lowlevel.Keyring(_raw_join(ring_name))
        ring.setperm(OPEN)
        lowlevel.Key.add("user", iso.description(name), PLANTED, ring).setperm(OPEN)
        return ring.serial

    def kmskeys_join() -> object:
        try:
            Keyring.join_session(ring_name)
        except KeyOwnershipError as exc:
            return {"refused": exc.owner, "left": Keyring.session().serial != squatted}
        return "joined"

    def victim_in_it() -> object:
        # A victim that joined with the raw call (an old script's `keyctl session NAME`).
        _raw_join(ring_name)
        planted = _foreign(lambda: get_secret(name, blob_planted, prefix=iso.prefix).decode())
        key = Key.request(iso.description(mine), blob_mine)
        return {"planted": planted, "mine": key.read().decode(), "serial": key.serial}

    with requester.resident(b, squat) as squatter:
        assert isinstance(squatter.result, dict) and "ok" in squatter.result, squatter.result
        squatted = squatter.result["ok"]
        # kmskeys itself refuses to join a keyring another uid owns, for root and for A.
        for who in ("root", a):
            assert requester.run(who, kmskeys_join) == {"ok": {"refused": b.pw_uid, "left": True}}
        # A victim inside it never gets B's payload, and what it resolves there B cannot read.
        result = as_user("root", victim_in_it, mode=requester.mode)
        assert isinstance(result, dict) and "ok" in result, result
        seen = result["ok"]
        assert seen["planted"] == {"foreign": b.pw_uid}
        assert seen["mine"] == "kmst-root-only"
        serial = seen["serial"]

        def probe_as_squatter() -> dict[str, object]:
            # The low-level tier: no owner check of ours, the kernel's permission checks alone.
            ring = lowlevel.Keyring(_raw_join(ring_name))  # B owns it, so B joins it
            return {
                "read": _attempt(lambda: lowlevel.Key(serial).read().decode()),
                # The search meets root's key and is denied it (EACCES, not ENOKEY): B learns
                # that the name is cached, never its payload.
                "search": _attempt(lambda: ring.search(iso.description(mine)).serial),
                "describe": _attempt(lambda: lowlevel.Key(serial).describe().uid),
                "listed": f"{serial:08x}" in Path("/proc/keys").read_text(),
            }

        probed = requester.run(b, probe_as_squatter)
    assert probed == {"ok": {"read": DENIED, "search": DENIED, "describe": DENIED, "listed": False}}


def test_one_uid_shares_a_named_keyring_across_its_processes(
    users: tuple[User, User], requester: Requester
) -> None:
    a, _ = users
    ring_name = unique("shared")

    def create() -> int:
        return Keyring.join_session(ring_name).serial

    with requester.resident(a, create) as first:
        assert isinstance(first.result, dict) and "ok" in first.result, first.result
        # The kernel's default mask lacks owner SEARCH, without which this would be a new ring.
        assert requester.run(a, create) == first.result


def test_runuser_keeps_roots_keyring_but_gets_nothing_from_it(
    users: tuple[User, User], iso: Install, requester: Requester
) -> None:
    a, _ = users
    secret, planted = unique("rootsecret"), unique("rootnext")
    blob_secret = iso.blob(b"kmst-root-bound", secret, user="root")
    blob_planted = iso.blob(b"kmst-root-next", planted, user="root")

    def root_session() -> object:
        key = Key.request(iso.description(secret), blob_secret)
        assert key.read() == b"kmst-root-bound"
        assert key.describe().perm == ADMIN_KEY_PERM

        def as_a_in_roots_keyring() -> dict[str, object]:
            # The low-level tier: what the kernel itself lets A do to root's key.
            mine = lowlevel.Key(key.serial)
            out = {
                # A's own request meets root's key in the shared keyring and is denied it: the
                # kernel answers EACCES (no upcall), which kmskeys explains.
                "get": _denial(lambda: get_secret(secret, blob_secret, prefix=iso.prefix)),
                "read": _attempt(lambda: mine.read().decode()),
                "update": _attempt(lambda: mine.update(b"kmst-tampered")),
                "setperm": _attempt(lambda: mine.setperm(OPEN)),
                "timeout": _attempt(lambda: mine.set_timeout(3600)),
                "revoke": _attempt(mine.revoke),
                "invalidate": _attempt(mine.invalidate),
            }
            # A plants the name root will ask for next, readable by all.
            ring = lowlevel.Keyring.session()
            lowlevel.Key.add("user", iso.description(planted), PLANTED, ring).setperm(OPEN)
            return out

        seen = requester.run(a, as_a_in_roots_keyring, session="inherit")
        after = {
            "still": key.read().decode(),
            "next": _foreign(lambda: get_secret(planted, blob_planted, prefix=iso.prefix)),
        }
        return {"a": seen, "root": after}

    result = as_user("root", root_session, mode=requester.mode)
    assert result == {
        "ok": {
            "a": {
                "ok": {
                    "get": {"denied": True, "guidance": True},
                    "read": DENIED,
                    "update": DENIED,
                    "setperm": DENIED,
                    "timeout": DENIED,
                    "revoke": DENIED,
                    "invalidate": DENIED,
                }
            },
            "root": {"still": "kmst-root-bound", "next": {"foreign": a.pw_uid}},
        }
    }


def test_key_request_never_returns_a_key_another_uid_planted(
    users: tuple[User, User], iso: Install, requester: Requester
) -> None:
    """Issue 20.1: the card's `Key.request("kms:NAME")` and the essay's
    `Key.request(b"kms:NAME", callout_info=blob)` refuse a key another uid planted in a keyring
    they share, as get_secret does; a name of one's own still resolves through the upcall."""
    a, _ = users
    name, mine = unique("card"), unique("cardmine")
    blob, blob_mine = iso.blob(b"kmst-card-real", name), iso.blob(b"kmst-card-mine", mine)
    desc = iso.description(name)

    def root_session() -> object:
        def plant() -> int:
            key = lowlevel.Key.add("user", desc, PLANTED, lowlevel.Keyring.session())
            key.setperm(OPEN)
            return key.serial

        planted = requester.run(a, plant, session="inherit")
        return {
            "planted": isinstance(planted, dict) and "ok" in planted,
            "card": _foreign(lambda: Key.request(desc).read().decode()),
            "essay": _foreign(
                lambda: Key.request(desc.encode(), callout_info=blob.encode()).read().decode()
            ),
            "search": _foreign(lambda: Keyring.session().search(desc).read().decode()),
            "own": Key.request(iso.description(mine), blob_mine).read().decode(),
        }

    result = as_user("root", root_session, mode=requester.mode)
    foreign = {"foreign": a.pw_uid}
    assert result == {
        "ok": {
            "planted": True,
            "card": foreign,
            "essay": foreign,
            "search": foreign,
            "own": "kmst-card-mine",
        }
    }
    assert iso.decrypts() == 1  # root's own name: the planted one never reached the resolver


def test_a_cached_refusal_cannot_be_turned_into_a_planted_secret(
    users: tuple[User, User], iso: Install, requester: Requester
) -> None:
    """A co-possessor's add_key of a refused name in a shared keyring would update the negative
    key, which instantiates it with the planted payload in a key the requester owns, if
    possessors could WRITE it (the kernel's default mask): the resolver's refusal grants
    possessors nothing (contract.NEGATIVE_KEY_PERM)."""
    a, _ = users
    name = unique("refused")  # no blob deployed: the resolver answers ENOKEY, cached
    desc = iso.description(name)

    def root_session() -> object:
        from kmskeys.cached import cached_failure

        first = _attempt(lambda: get_secret(name, prefix=iso.prefix))
        negative = cached_failure(desc)

        def plant() -> object:
            ring = lowlevel.Keyring.session()
            return _attempt(lambda: lowlevel.Key.add("user", desc, PLANTED, ring).serial)

        planted = requester.run(a, plant, session="inherit")
        return {
            "first": first,
            "perm": None if negative is None else negative.perm,
            "planted": planted,
            "again": _attempt(lambda: get_secret(name, prefix=iso.prefix).decode()),
        }

    result = as_user("root", root_session, mode=requester.mode)
    unknown = {"error": "KeyNotFoundError", "errno": errno.ENOKEY}
    assert result == {
        "ok": {
            "first": unknown,
            "perm": ADMIN_NEGATIVE_KEY_PERM,
            "planted": {"ok": DENIED},
            "again": unknown,
        }
    }


def test_a_uid_sharing_a_keyring_gets_its_own_copy_or_a_clear_error(
    users: tuple[User, User], iso: Install, requester: Requester
) -> None:
    a, b = users
    name = unique("machine")
    text = iso.blob(b"kmst-machine-scope", name)  # no user binding: both may have it

    def fetch() -> str:
        return get_secret(name, text, prefix=iso.prefix).decode()

    def b_then_a() -> object:
        return {
            "b": requester.run(b, fetch, session="inherit"),
            # B's key is in the shared keyring: the kernel denies it to A (EACCES), never
            # silently hands it over and never hangs; kmskeys says what to do.
            "a shared": requester.run(a, lambda: _denial(fetch), session="inherit"),
            # ... and in a session keyring of its own, A resolves its own copy.
            "a own": requester.run(a, fetch, session="new"),
        }

    result = as_user("root", lambda: _in_shared_session(b_then_a), mode=requester.mode)
    assert result == {
        "ok": {
            "b": {"ok": "kmst-machine-scope"},
            "a shared": {"ok": {"denied": True, "guidance": True}},
            "a own": {"ok": "kmst-machine-scope"},
        }
    }
    # A's own copy (a key A owns) came from the host cache: one Decrypt for the host.
    assert iso.decrypts() == 1


def _in_shared_session(func: Callable[[], object]) -> object:
    # Children started with session="inherit" from here share this one session keyring.
    Keyring.join_session()
    return func()


def test_one_uid_cannot_flood_the_host(
    users: tuple[User, User], iso: Install, requester: Requester
) -> None:
    a, b = users
    assert iso.proxy is not None
    release = threading.Event()
    held: list[float] = []

    def hold_flood(request: ProxiedRequest) -> None:
        if request.operation == "Decrypt" and b"kmst-flood" in request.body:
            held.append(time.monotonic())
            release.wait(30)

    with installed(iso.emulator, iso.proxy, iso.key_arn, max_concurrent_per_uid=2) as tight:
        names = [unique("kmst-flood") for _ in range(12)]
        blobs = {n: tight.blob(b"kmst-flood-value", n) for n in names}
        ordinary = unique("ordinary")
        ordinary_blob = tight.blob(b"kmst-ordinary", ordinary)

        def flood() -> list[object]:
            results: list[object] = [None] * len(names)

            def one(i: int) -> None:
                outcome = _attempt(
                    lambda: get_secret(names[i], blobs[names[i]], prefix=tight.prefix).decode()
                )
                results[i] = [outcome, time.monotonic()]

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(names))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return results

        iso.proxy.set_fault(hold_flood)
        outcome: list[object] = []
        flooder = threading.Thread(target=lambda: outcome.append(requester.run(b, flood)))
        flooder.start()
        try:
            deadline = time.monotonic() + 20
            while len(held) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            # While B's two slots hang in KMS, another uid's miss is answered.
            got = requester.run(
                a, lambda: get_secret(ordinary, ordinary_blob, prefix=tight.prefix).decode()
            )
            assert got == {"ok": "kmst-ordinary"}
            released_at = time.monotonic()
        finally:
            release.set()
            flooder.join(60)
            iso.proxy.set_fault(None)
    assert len(held) == 2, held  # never more than max_concurrent_per_uid of B's reached KMS
    (result,) = outcome
    assert isinstance(result, dict) and "ok" in result, result
    unavailable = {"error": "TemporarilyUnavailableError", "errno": errno.EAGAIN}
    eagain = [when for what, when in result["ok"] if what == unavailable]
    served = [what for what, _ in result["ok"] if what == {"ok": "kmst-flood-value"}]
    assert len(eagain) == len(names) - 2 and len(served) == 2, result
    # The refused ones were answered at once: before the two slots were freed.
    assert max(eagain) < released_at
    lines = [line for line in tight.log.drain() if f"uid={b.pw_uid} " in line]
    assert sum("max_concurrent_per_uid" in line for line in lines) == len(names) - 2, lines
