"""The host cache: one Decrypt per host and blob, kept root-only, and never a way around a check.

Whatever inspects root's persistent keyring runs in a child (`as_user("root", ...)`): linking it
into the pytest process would give that process a process keyring (tests/conftest.py).
"""

from __future__ import annotations

import hashlib

import pytest

from kmskeys import Key, KeyRejectedError, Keyring
from kmskeys.blob import parse_blob
from kmskeys.contract import HOSTCACHE_PERM, hostcache_entry
from tests.support.names import unique
from tests.support.requester import NOBODY, as_user
from tests.upcall.daemonpath import phases
from tests.upcall.harness import Install

pytestmark = pytest.mark.upcall

# Phases of a request that loaded botocore, built a KMS client or called KMS.
EXPENSIVE = {"import", "client", "decrypt"}


def _entry_of(install: Install, name: str, text: str, user: str | None = None) -> str:
    # Keyed on the blob's canonical text: its version-1 form, whatever the spelling.
    canonical = parse_blob(text).identity()
    digest = hashlib.blake2b(canonical.encode(), digest_size=32).hexdigest()
    return hostcache_entry(install.prefix, name, user, digest)


def _ask(install: Install, name: str, blob: str = "") -> bytes:
    """request_key + read, without get_secret's per-thread memory of recent serials (which
    would answer a repeated request without searching the new session keyring)."""
    return Key.request(install.description(name), blob).read()


def _describe_entry(desc: str) -> object:
    """In a root child: (uid, perm) of the host-cache entry `desc`."""

    def look() -> list[int]:
        from kmskeys import Key, keyutils
        from kmskeys.hostflush import host_cache_ring

        ring = host_cache_ring(create=False)
        assert ring is not None
        described = Key(keyutils.keyctl_search(ring, b"user", desc.encode(), 0)).describe()
        return [described.uid, described.perm]

    return as_user("root", look)


def test_a_miss_from_any_keyring_or_uid_is_answered_without_kms(resolver: Install) -> None:
    name = unique("hc")
    text = resolver.blob(b"kmst-hostcache", name)
    resolver.deploy(name, text)
    assert resolver.get(name) == b"kmst-hostcache"
    assert " source=blob_dir " in resolver.log.wait_for(name) + " "
    Keyring.join_session()  # another service: a keyring of its own
    assert _ask(resolver, name) == b"kmst-hostcache"
    line = resolver.log.wait_for(name)
    assert " source=hostcache " in line and " outcome=ok " in line, line
    # No botocore import, no client, no KMS call: the timings name none of those phases.
    assert not EXPENSIVE & phases(line), line
    # Another uid asking for the same blob (not user-bound): the same entry.
    assert as_user(NOBODY, lambda: resolver.get(name).decode()) == {"ok": "kmst-hostcache"}
    assert " source=hostcache " in resolver.log.wait_for(name)
    assert resolver.decrypts() == 1
    # The entry is root's alone: owner uid 0, nothing for group or other.
    assert _describe_entry(_entry_of(resolver, name, text)) == {"ok": [0, HOSTCACHE_PERM]}


def test_another_uid_cannot_reach_the_host_cache(resolver: Install) -> None:
    name = unique("hcroot")
    text = resolver.blob(b"kmst-hostcache-root", name)
    assert resolver.get(name, text) == b"kmst-hostcache-root"
    desc = _entry_of(resolver, name, text)

    def serial() -> int:
        from kmskeys import keyutils
        from kmskeys.hostflush import host_cache_ring

        ring = host_cache_ring(create=False)
        assert ring is not None
        return keyutils.keyctl_search(ring, b"user", desc.encode(), 0)

    found = as_user("root", serial)
    assert isinstance(found, dict) and isinstance(found.get("ok"), int), found

    def probe() -> dict[str, str]:
        # The low-level tier: what the kernel itself refuses, without the client's owner check.
        from kmskeys import keyutils
        from kmskeys.lowlevel import Key

        out = {}
        for what, call in (
            ("persistent", lambda: keyutils.keyctl_get_persistent(0, 0)),
            ("read", lambda: Key(found["ok"]).read()),
        ):
            try:
                call()
                out[what] = "allowed"
            except Exception as exc:
                out[what] = type(exc).__name__
        return out

    # A real unprivileged process (setuid: no upcall needed here): root's persistent keyring
    # needs CAP_SETUID, and the entry grants other uids nothing.
    assert as_user(NOBODY, probe, mode="setuid") == {
        "ok": {"persistent": "OperationNotPermittedError", "read": "KeyPermissionError"}
    }


def test_policy_and_the_key_allowlist_come_before_the_host_cache(resolver: Install) -> None:
    # The session config gives the nobodyonly names to nobody alone.
    name = unique("nobodyonly")
    text = resolver.blob(b"kmst-nobody-only", name)
    resolver.deploy(name, text)
    assert as_user(NOBODY, lambda: resolver.get(name).decode()) == {"ok": "kmst-nobody-only"}
    resolver.log.wait_for(name)
    with pytest.raises(KeyRejectedError):
        resolver.get(name)  # root, with the entry fresh in the host cache
    assert " outcome=refused " in resolver.log.wait_for(name)
    # A key the config no longer lists: refused before the cache, and the entry is dropped.
    other = unique("allowlist")
    other_text = resolver.blob(b"kmst-allowlist", other)
    resolver.deploy(other, other_text)
    assert resolver.get(other) == b"kmst-allowlist"
    original = resolver.config.read_text()
    foreign = resolver.key_arn.rsplit("/", 1)[0] + "/00000000-0000-0000-0000-000000000000"
    try:
        resolver.config.write_text(original.replace(resolver.key_arn, foreign))
        Keyring.join_session()
        with pytest.raises(KeyRejectedError):
            _ask(resolver, other)
    finally:
        resolver.config.write_text(original)
    assert resolver.decrypts() == 2
    Keyring.join_session()
    assert _ask(resolver, other) == b"kmst-allowlist"
    assert resolver.decrypts() == 3  # purged by the refusal: decrypted again


def test_only_an_identical_request_hits(resolver: Install) -> None:
    name = unique("hcbound")
    bound = resolver.blob(b"kmst-root-bound", name, user="root")
    assert resolver.get(name, bound) == b"kmst-root-bound"
    assert " outcome=ok " in resolver.log.wait_for(name)
    # Another user with the very same user-bound blob: refused before the cache, locally (the
    # blob records root); its version-1 form has no record, so there KMS decides (and refuses).
    refused = as_user(NOBODY, lambda: resolver.get(name, bound).decode())
    assert refused == {"error": "KeyRejectedError", "errno": 129}, refused
    assert "encrypted for user 'root', not 'nobody'" in resolver.log.wait_for(name)
    assert resolver.decrypts() == 1
    unrecorded = parse_blob(bound).identity()
    refused = as_user(NOBODY, lambda: resolver.get(name, unrecorded).decode())
    assert refused == {"error": "KeyRejectedError", "errno": 129}, refused
    assert resolver.decrypts() == 2
    # A redeployed blob (new text) is a new entry, whatever the old one holds.
    Keyring.join_session()
    redeployed = resolver.blob(b"kmst-root-bound-v2", name, user="root")
    assert _ask(resolver, name, redeployed) == b"kmst-root-bound-v2"
    assert resolver.decrypts() == 3
