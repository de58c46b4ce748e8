"""KMS binds every blob to its name, and optionally to a user; the key is the requester's alone."""

from __future__ import annotations

import errno
import pwd
from datetime import UTC, datetime, timedelta

import pytest

from kmskeys import Key, KeyRejectedError, get_secret
from kmskeys.blob import (
    CONTEXT_NAME,
    CONTEXT_NOT_AFTER,
    VERSION,
    Blob,
    format_not_after,
    parse_blob,
)
from kmskeys.contract import ADMIN_KEY_PERM as KEY_PERM
from kmskeys.hostflush import admin_gid
from tests.support.names import unique
from tests.support.requester import NOBODY, Requester
from tests.upcall.conftest import Install

pytestmark = pytest.mark.upcall

# A second unprivileged account that exists on every Debian system.
OTHER = pwd.getpwnam("daemon")
NOBODY_ENTRY = pwd.getpwuid(NOBODY)


def _request_as(
    requester: Requester, entry: pwd.struct_passwd, install: Install, name: str, blob: str | None
) -> object:
    def fetch() -> str:
        return get_secret(name, blob, prefix=install.prefix).decode()

    return requester.run(entry, fetch)


def test_user_bound_blob_resolves_for_its_user(resolver: Install, requester: Requester) -> None:
    name = unique("bound")
    text = resolver.blob(b"for nobody", name, user=NOBODY_ENTRY.pw_name)
    assert _request_as(requester, NOBODY_ENTRY, resolver, name, text) == {"ok": "for nobody"}
    assert f"uid={NOBODY} user={NOBODY_ENTRY.pw_name} " in resolver.log.wait_for(name)


def test_user_bound_blob_is_refused_to_another_user(
    resolver: Install, requester: Requester
) -> None:
    name = unique("bound")
    text = resolver.blob(b"for nobody", name, user=NOBODY_ENTRY.pw_name)
    resolver.deploy(name, text)
    # The blob records its user: refused locally, inline or from blob_dir. Its version-1 form
    # records none: KMS refuses it (the context binds the user either way).
    unrecorded = parse_blob(text).identity()
    for blob, why in (
        (text, f"blob was encrypted for user '{NOBODY_ENTRY.pw_name}', not '{OTHER.pw_name}'"),
        (None, f"blob was encrypted for user '{NOBODY_ENTRY.pw_name}', not '{OTHER.pw_name}'"),
        (unrecorded, "InvalidCiphertextException"),
    ):
        result = _request_as(requester, OTHER, resolver, name, blob)
        assert result == {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}, (
            resolver.log.drain()
        )
        line = resolver.log.wait_for(name)
        assert "outcome=refused" in line and why in line, line
    assert resolver.decrypts() == 1
    # Root is "another user" too: the binding is to the name, not to privilege.
    with pytest.raises(KeyRejectedError):
        resolver.get(name + "-root", resolver.blob(b"x", name + "-root", user="nobody"))


def test_blob_presented_under_another_name_is_refused(resolver: Install) -> None:
    name, other = unique("name"), unique("other")
    text = resolver.blob(b"mine", name)
    with pytest.raises(KeyRejectedError) as caught:
        resolver.get(other, text)
    assert "journalctl -t kmskeys-resolver" in str(caught.value)
    assert f"blob was encrypted for '{name}', not '{other}'" in resolver.log.wait_for(other)
    # The refusal is now negatively cached for `other`: present the blob's version-1 form (no
    # recorded name) as a file under a third name, so KMS is asked, and refuses.
    third = unique("third")
    resolver.deploy(third, parse_blob(text).identity())
    with pytest.raises(KeyRejectedError):
        Key.request(resolver.description(third), b"")
    assert "InvalidCiphertextException" in resolver.log.wait_for(third)
    assert resolver.decrypts() == 1


def _blob_with_not_after(install: Install, name: str, when: datetime) -> str:
    stamp = format_not_after(when)
    encrypted = install.kms().encrypt(
        KeyId=install.key_arn,
        Plaintext=b"dated",
        EncryptionContext={CONTEXT_NAME: name, CONTEXT_NOT_AFTER: stamp},
    )
    blob = Blob(
        version=VERSION,
        mode="direct",
        key_arn=encrypted["KeyId"],
        binds_user=False,
        metadata={CONTEXT_NOT_AFTER: stamp},
        ciphertext=encrypted["CiphertextBlob"],
        name=name,
    )
    return blob.to_text()


def test_expired_blob_is_refused_without_calling_kms(resolver: Install) -> None:
    name = unique("expired")
    text = _blob_with_not_after(resolver, name, datetime.now(UTC) - timedelta(minutes=1))
    with pytest.raises(KeyRejectedError):
        resolver.get(name, text)
    assert "expired" in resolver.log.wait_for(name)
    assert resolver.decrypts() == 0


def test_unexpired_blob_resolves(resolver: Install) -> None:
    name = unique("dated")
    text = _blob_with_not_after(resolver, name, datetime.now(UTC) + timedelta(days=1))
    assert resolver.get(name, text) == b"dated"


def test_allow_users_policy_refuses_before_kms(resolver: Install, requester: Requester) -> None:
    name = unique("nobodyonly")  # the session config allows only `nobody` for these names
    text = resolver.blob(b"policy", name)
    with pytest.raises(KeyRejectedError):
        resolver.get(name, text)
    assert "policy" in resolver.log.wait_for(name)
    assert resolver.decrypts() == 0
    assert _request_as(requester, NOBODY_ENTRY, resolver, name, text) == {"ok": "policy"}


def test_key_belongs_to_the_requester_and_denies_other_uids(
    resolver: Install, requester: Requester
) -> None:
    name = unique("perm")
    text = resolver.blob(b"private", name)
    assert _request_as(requester, NOBODY_ENTRY, resolver, name, text) == {"ok": "private"}
    key = Key.request(resolver.description(name), text)  # root's own copy
    assert key.read() == b"private"
    desc = key.describe()
    assert (desc.uid, desc.perm) == (0, KEY_PERM)

    def read_without_possession() -> str:
        # The low-level tier: no owner check of the client's, the kernel's permissions alone.
        from kmskeys.lowlevel import Key as Unchecked

        return Unchecked(key.serial).read().decode()

    # A fresh session keyring: no possession, so only the uid/group/other bits apply.
    for entry in (NOBODY_ENTRY, OTHER):
        result = requester.run(entry, read_without_possession)
        assert result == {"error": "KeyPermissionError", "errno": errno.EACCES}


def test_key_of_an_unprivileged_requester_is_owned_by_it(
    resolver: Install, requester: Requester
) -> None:
    name = unique("owner")
    text = resolver.blob(b"owned", name)

    def describe() -> list[int]:
        key = Key.request(f"{resolver.prefix}:{name}", text)
        desc = key.describe()
        return [desc.uid, desc.gid, desc.perm]

    result = requester.run(NOBODY_ENTRY, describe)
    # The admin group (install creates it) lets root's flush find the key, never read it.
    assert result == {"ok": [NOBODY, admin_gid(), KEY_PERM]}
