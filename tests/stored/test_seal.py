"""`seal = "kms"` end to end: a moto server over HTTP, through the counting and faulting proxy.

moto checks the encryption context on Decrypt, so the binding to host, scope and name is tested
for real. It does not evaluate IAM conditions (`ec2:SourceInstanceARN`): that part of the seal,
which stops another instance's role from even asking, is checked against the Terraform policy
(tests/terraform), not here.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import kmskeys
from kmskeys import KeyRejectedError, Keyring, TemporarilyUnavailableError
from resolver.keystore import Entry, EntryId
from resolver.seal import seal_context
from tests.stored.conftest import UID_A, as_user
from tests.stored.harness import StoredInstall, stored_installed
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import DROP, KmsProxy
from tests.support.names import unique
from tests.upcall.harness import kms_stack

pytestmark = pytest.mark.upcall

HOST = "arn:aws:ec2:us-east-1:123456789012:instance/i-0a1b2c3d4e5f60718"
OTHER_HOST = "arn:aws:ec2:us-east-1:123456789012:instance/i-0ffffffffffffffff"


class Sealed:
    """A KMS-sealed install and the emulator behind it."""

    def __init__(self, install: StoredInstall, emulator: KmsEmulator, proxy: KmsProxy, arn: str):
        self.install, self.emulator, self.proxy, self.arn = install, emulator, proxy, arn


@pytest.fixture(scope="module")
def sealed_stack() -> Iterator[Sealed]:
    with kms_stack() as (emulator, proxy, arn):
        settings = {"seal": "kms", "seal_key_arn": arn, "seal_host": HOST}
        with stored_installed(kms_endpoint=proxy.url, **settings) as install:
            yield Sealed(install, emulator, proxy, arn)


@pytest.fixture
def sealed(sealed_stack: Sealed, session_keyring: object) -> Iterator[Sealed]:
    sealed_stack.proxy.set_fault(None)
    sealed_stack.proxy.reset_counts()
    sealed_stack.install.log.drain()
    try:
        yield sealed_stack
    finally:
        sealed_stack.proxy.set_fault(None)


def test_sealed_entry_is_kms_ciphertext_bound_to_host_scope_and_name(sealed: Sealed) -> None:
    store, name = sealed.install, unique("sealed")
    key = store.request(name)
    assert (sealed.proxy.count("Encrypt"), sealed.proxy.count("Decrypt")) == (1, 0)
    assert "mode=user.v1.sealed" in store.log.wait_for(name)
    raw = store.entry(name).read_bytes()
    assert key not in raw
    eid = EntryId("user", 0, name, 1)
    entry = Entry.decode(raw, eid, "test")
    assert (entry.seal, entry.seal_key_arn, entry.key_size) == ("kms", sealed.arn, 32)
    # From the keystore again (nothing cached): one Decrypt, the same key.
    Keyring.join_session()
    assert store.request(name) == key
    assert sealed.proxy.count("Decrypt") == 1
    # The documented context opens it; any other host, scope or name does not.
    kms = sealed.emulator.client()
    context = seal_context(HOST, eid)
    assert context == {
        "kmskeys_seal": "stored",
        "kmskeys_host": HOST,
        "kmskeys_scope": "user:0",
        "kmskeys_name": name,
    }
    opened = kms.decrypt(CiphertextBlob=entry.material, KeyId=sealed.arn, EncryptionContext=context)
    assert opened["Plaintext"] == key
    for changed in (
        {"kmskeys_host": OTHER_HOST},
        {"kmskeys_scope": "machine"},
        {"kmskeys_scope": "user:1"},
        {"kmskeys_name": name + "x"},
    ):
        with pytest.raises(kms.exceptions.InvalidCiphertextException):
            kms.decrypt(
                CiphertextBlob=entry.material,
                KeyId=sealed.arn,
                EncryptionContext={**context, **changed},
            )


def test_keystore_copied_to_another_host_is_useless(sealed: Sealed) -> None:
    name = unique("copied")
    key = sealed.install.request(name)
    other_settings = {"seal": "kms", "seal_key_arn": sealed.arn, "seal_host": OTHER_HOST}
    # The other host's keystore is a copy of this one (owners, modes and all): install refuses
    # two installs on one host that share a keystore_dir.
    with tempfile.TemporaryDirectory(prefix=unique("copy") + "-") as there:
        copy = Path(there) / "keystore"
        subprocess.run(["cp", "-a", str(sealed.install.keystore), str(copy)], check=True)
        with stored_installed(
            keystore=copy, kms_endpoint=sealed.proxy.url, **other_settings
        ) as elsewhere:
            with pytest.raises(KeyRejectedError):
                elsewhere.request(name)
            assert "KMS InvalidCiphertextException" in elsewhere.log.wait_for(name)
    Keyring.join_session()
    assert sealed.install.request(name) == key  # still this host's, untouched


def test_kms_down_and_nothing_cached_is_eagain(sealed: Sealed) -> None:
    store = sealed.install
    kept, fresh = unique("kept"), unique("fresh")
    key = store.request(kept)
    store.log.wait_for(kept)  # the creation's line, out of the way
    sealed.proxy.set_fault(lambda request: DROP)
    Keyring.join_session()
    for name in (kept, fresh):
        with pytest.raises(TemporarilyUnavailableError):
            store.request(name)
        line = store.log.wait_for(name)
        assert "outcome=unavailable" in line and "errno=EAGAIN" in line
    assert not store.entry(fresh).exists()
    assert not [p for p in store.files() if p.name.startswith(".tmp-")]
    # EAGAIN is not cached: with KMS back, the next requests answer at once.
    sealed.proxy.set_fault(None)
    assert store.request(kept) == key
    assert len(store.request(fresh)) == 32


def test_dpapi_on_a_sealed_keystore(sealed: Sealed) -> None:
    prefix = sealed.install.stored_prefix
    name = unique("dpapisealed")

    def round_trip() -> str:
        blob = kmskeys.protect(b"sealed at rest", name=name, prefix=prefix)
        Keyring.join_session()  # nothing cached: the master key is unsealed again
        return kmskeys.unprotect(blob, prefix=prefix).decode()

    assert as_user(UID_A, round_trip) == {"ok": "sealed at rest"}
    assert sealed.install.entry(name, uid=UID_A).exists()


def test_an_empty_bucket_makes_no_kms_call() -> None:
    # Every seal and unseal is a KMS call of the requester's, from its uid's bucket: two tokens
    # here, refilled once in ~17 min. Then a miss of an existing entry (Decrypt) and a first
    # request (Encrypt) are EAGAIN without any call reaching KMS, and nothing is written.
    with kms_stack() as (_emulator, proxy, arn):
        settings = {
            "seal": "kms",
            "seal_key_arn": arn,
            "seal_host": HOST,
            "kms_rate_per_uid": 0.001,
            "kms_burst_per_uid": 2,
        }
        with stored_installed(kms_endpoint=proxy.url, **settings) as store:
            kept, fresh = unique("bucketkept"), unique("bucketfresh")
            key = store.request(kept)  # Encrypt: one token
            Keyring.join_session()
            assert store.request(kept) == key  # Decrypt: the second
            assert (proxy.count("Encrypt"), proxy.count("Decrypt")) == (1, 1)
            for _ in range(2):
                assert "outcome=ok" in store.log.wait_for(kept)  # out of the way
            for name in (kept, fresh):
                Keyring.join_session()
                with pytest.raises(TemporarilyUnavailableError):
                    store.request(name)
                line = store.log.wait_for(name)
                assert "errno=EAGAIN" in line and "over its KMS call rate" in line, line
            assert (proxy.count("Encrypt"), proxy.count("Decrypt")) == (1, 1)
            assert not store.entry(fresh).exists()
            # Another uid has a bucket of its own.
            other = unique("bucketother")
            assert as_user(UID_A, lambda: len(store.request(other))) == {"ok": 32}
            assert proxy.count("Encrypt") == 2
