"""Two real users against each other: B never gets A's secret, key or keyring.

The kernel enforces the key permissions the resolver sets (possessor all, owner uid
view/read/search, nothing for others); KMS enforces the user binding (`kmskeys_user` comes from
the kernel's %u, never from the blob); the resolver enforces `allow_users` before KMS.
"""

from __future__ import annotations

import errno
import pwd
import time
from pathlib import Path

import pytest

from kmskeys import Key, Keyring, KmsKeysError, QuotaExceededError, get_secret
from tests.support.names import unique
from tests.support.requester import Requester
from tests.upcall.harness import Install

pytestmark = pytest.mark.isolation

User = pwd.struct_passwd
REFUSED = {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}
DENIED = {"error": "KeyPermissionError", "errno": errno.EACCES}
NOT_FOUND = {"error": "KeyNotFoundError", "errno": errno.ENOKEY}


def _attempt(func: object) -> object:
    """func()'s result, or the error class and errno it raised (JSON-able)."""
    try:
        return {"ok": func()}  # type: ignore[operator]
    except KmsKeysError as exc:
        return {"error": type(exc).__name__, "errno": exc.errno}


def test_b_never_reads_as_instantiated_key(
    users: tuple[User, User], iso: Install, requester: Requester
) -> None:
    a, b = users
    name = unique("private")
    text = iso.blob(b"kmst-for-a-only", name)
    desc = iso.description(name)

    def resolve_as_a() -> dict[str, object]:
        key = Key.request(desc, text)
        return {"serial": key.serial, "ring": Keyring.session().serial, "read": key.read().decode()}

    with requester.resident(a, resolve_as_a) as holder:
        assert isinstance(holder.result, dict) and "ok" in holder.result, holder.result
        held = holder.result["ok"]
        assert held["read"] == "kmst-for-a-only"
        serial, ring = held["serial"], held["ring"]

        def probe_as_b() -> dict[str, object]:
            # The low-level tier: no owner check of the client's, the kernel's permissions alone.
            from kmskeys.lowlevel import Key, Keyring

            proc_keys = Path("/proc/keys").read_text()
            return {
                "read": _attempt(lambda: Key(serial).read().decode()),
                "describe": _attempt(lambda: Key(serial).describe().description),
                "search": _attempt(lambda: Keyring.session().search(desc).serial),
                "request": _attempt(lambda: Key.request(desc).serial),
                "link": _attempt(lambda: Keyring.session().link_key(Key(serial))),
                "list a's ring": _attempt(lambda: [k.serial for k in Keyring(ring).list()]),
                "in /proc/keys": f"{serial:08x}" in proc_keys or desc in proc_keys,
            }

        probed = requester.run(b, probe_as_b)
    assert probed == {
        "ok": {
            "read": DENIED,
            "describe": DENIED,
            "search": NOT_FOUND,
            "request": NOT_FOUND,
            "link": DENIED,
            "list a's ring": DENIED,
            "in /proc/keys": False,
        }
    }


def test_blob_bound_to_a_never_decrypts_for_b(
    users: tuple[User, User], iso: Install, requester: Requester
) -> None:
    a, b = users
    name = unique("bound")
    text = iso.blob(b"kmst-bound-to-a", name, user=a.pw_name)
    iso.deploy(name, text)

    def fetch_inline() -> str:
        return get_secret(name, text, prefix=iso.prefix).decode()

    def fetch_from_blob_dir() -> str:
        return get_secret(name, prefix=iso.prefix).decode()

    assert requester.run(b, fetch_inline) == REFUSED
    assert requester.run(b, fetch_from_blob_dir) == REFUSED
    # The blob records its user: refused locally, naming both users, with no KMS call.
    mismatch = f"blob was encrypted for user '{a.pw_name}', not '{b.pw_name}'"
    for _ in range(2):
        line = iso.log.wait_for(name)
        assert f"user={b.pw_name} " in line and mismatch in line, line
    assert iso.decrypts() == 0
    assert requester.run(a, fetch_inline) == {"ok": "kmst-bound-to-a"}
    assert requester.run(a, fetch_from_blob_dir) == {"ok": "kmst-bound-to-a"}


def test_b_cannot_have_the_resolver_instantiate_into_as_keyring(
    users: tuple[User, User], iso: Install, requester: Requester
) -> None:
    a, b = users
    mine, theirs = unique("a-own"), unique("pushed")
    blob_a = iso.blob(b"kmst-a", mine)
    blob_b = iso.blob(b"kmst-pushed", theirs)

    def a_resolves() -> dict[str, int]:
        key = Key.request(iso.description(mine), blob_a)
        return {"ring": Keyring.session().serial, "key": key.serial}

    def a_lists() -> list[int]:
        return [key.serial for key in Keyring.session().list()]

    with requester.resident(a, a_resolves) as holder:
        assert isinstance(holder.result, dict) and "ok" in holder.result, holder.result
        ring = holder.result["ok"]["ring"]
        before = iso.decrypts()

        def push_as_b() -> object:
            return Key.request(iso.description(theirs), blob_b, destination=ring).serial

        # The kernel checks write permission on the destination before any upcall.
        assert requester.run(b, push_as_b) == DENIED
        assert iso.decrypts() == before

        def same_name_as_b() -> list[int]:
            key = Key.request(iso.description(mine), blob_a)
            desc = key.describe()
            return [key.serial, desc.uid]

        # Machine scope: B may have the secret, but only as its own key, owned by B.
        result = requester.run(b, same_name_as_b)
        assert isinstance(result, dict) and "ok" in result, result
        assert result["ok"][0] != holder.result["ok"]["key"] and result["ok"][1] == b.pw_uid

    # A's keyring still holds only A's key (checked from a fresh child joining nothing).
    with requester.resident(a, a_lists) as again:
        assert again.result == {"ok": []}  # a new session: nothing was pushed anywhere shared


def test_allow_users_is_enforced_by_name_and_uid(
    users: tuple[User, User], iso: Install, requester: Requester
) -> None:
    a, b = users
    for stem in ("aonly", "auid"):
        name = unique(stem)
        text = iso.blob(b"kmst-policy", name)

        def fetch(name: str = name, text: str = text) -> str:
            return get_secret(name, text, prefix=iso.prefix).decode()

        assert requester.run(b, fetch) == REFUSED
        assert "policy" in iso.log.wait_for(name)
        with pytest.raises(KmsKeysError):
            fetch()  # root is not on the list either
        assert "policy" in iso.log.wait_for(name)
        assert iso.decrypts() == 0
        assert requester.run(a, fetch) == {"ok": "kmst-policy"}
        iso.proxy.reset_counts()  # type: ignore[union-attr]


def _fill_quota(keep_free: int) -> int:
    """Add keys to the session keyring until the byte quota has `keep_free` bytes left or less."""
    ring = Keyring.session()
    added = 0
    for size in (4000, 1000, 250, 60, 15, 1):
        while True:
            try:
                ring.add_key("user", f"kmst-fill-{size:04d}-{added:04d}-" + "f" * 30, b"q" * size)
            except QuotaExceededError:
                break
            added += 1
    if keep_free:
        # Free one 60-byte filler: room for a key's description, not for a 1000-byte payload.
        small = [k for k in ring.list() if k.describe().description.startswith("kmst-fill-0060-")]
        small[0].unlink(ring)
        time.sleep(0.3)  # the key GC returns the quota asynchronously
    return added


def _quota_bytes(uid: int) -> int:
    for line in Path("/proc/key-users").read_text().splitlines():
        owner, _, rest = line.partition(":")
        if int(owner) == uid:
            return int(rest.split()[3].split("/")[0])
    return 0


def _wait_for_quota_release(uid: int) -> None:
    # The key GC frees a dead session keyring's keys, and their quota, asynchronously.
    end = time.monotonic() + 10
    while _quota_bytes(uid) > 1000 and time.monotonic() < end:
        time.sleep(0.1)
    assert _quota_bytes(uid) <= 1000, Path("/proc/key-users").read_text()


def test_full_key_quota_is_quota_exceeded_pointing_to_doctor(
    users: tuple[User, User], iso: Install, requester: Requester
) -> None:
    a, _ = users
    full, nearly = unique("quota"), unique("quota")
    blob_full = iso.blob(b"q" * 1000, full)
    blob_nearly = iso.blob(b"q" * 1000, nearly)

    def when_full() -> object:
        _fill_quota(keep_free=0)
        try:
            get_secret(full, blob_full, prefix=iso.prefix)
        except QuotaExceededError as exc:
            return str(exc)
        return "no error"

    def when_nearly_full() -> object:
        _fill_quota(keep_free=1)
        try:
            get_secret(nearly, blob_nearly, prefix=iso.prefix)
        except QuotaExceededError as exc:
            return str(exc)
        return "no error"

    # Completely full: the kernel cannot even create the key, before any upcall.
    result = requester.run(a, when_full)
    assert isinstance(result, dict) and "kmskeys doctor" in str(result.get("ok")), result
    _wait_for_quota_release(a.pw_uid)
    # Room for the key but not its payload: the resolver's instantiate fails and it says so.
    result = requester.run(a, when_nearly_full)
    assert isinstance(result, dict) and "kmskeys doctor" in str(result.get("ok")), result
    line = iso.log.wait_for(nearly)
    assert "outcome=quota" in line and "errno=EDQUOT" in line, line
    _wait_for_quota_release(a.pw_uid)
