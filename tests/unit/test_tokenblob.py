"""kmskeys.tokenblob: the kmsp2: format and its bindings, with a software RSA key standing in
for the token's private half (the token tests in tests/tokens open the same blobs on SoftHSM2).
"""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from encryptor.errors import InputError
from encryptor.tokenencrypt import encrypt_to_token, parse_pkcs11_uri
from kmskeys.blob import BlobFormatError, parse_blob
from kmskeys.tokenblob import (
    TokenEnvelope,
    is_token_blob,
    key_id,
    open_blob,
    open_entry,
    parse_token_blob,
    seal_blob,
    seal_entry,
)

pytestmark = pytest.mark.unit

PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SPKI = PRIVATE.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _unwrap(envelope: TokenEnvelope) -> bytes:
    """What the token does: RSA-OAEP (SHA-1, MGF1-SHA-1) decryption of the wrapped data key."""
    sha1 = hashes.SHA1()
    oaep = padding.OAEP(mgf=padding.MGF1(sha1), algorithm=sha1, label=None)
    return PRIVATE.decrypt(envelope.wrapped, oaep)


def test_a_blob_round_trips_through_its_text() -> None:
    metadata = {"kmskeys_not_after": "2099-01-01T00:00:00Z", "team": "a"}
    blob = seal_blob(SPKI, b"secret", "db/password", user="alice", metadata=metadata)
    text = blob.to_text()
    assert text.startswith("kmsp2:") and is_token_blob(text) and is_token_blob(text.encode())
    parsed = parse_token_blob(text + "\n")
    assert parsed.to_text() == text
    assert (parsed.name, parsed.user, parsed.binds_user) == ("db/password", "alice", True)
    assert parsed.envelope.key_id == key_id(SPKI)
    assert open_blob(parsed, _unwrap(parsed.envelope), "db/password", "alice") == b"secret"
    # A kmsk1 reader does not mistake it for a KMS blob.
    with pytest.raises(BlobFormatError):
        parse_blob(text)


@pytest.mark.parametrize(
    ("name", "user"), [("db/other", "alice"), ("db/password", "bob"), ("db/password", None)]
)
def test_name_and_user_come_from_the_request(name: str, user: str | None) -> None:
    blob = parse_token_blob(seal_blob(SPKI, b"secret", "db/password", user="alice").to_text())
    with pytest.raises(BlobFormatError):
        open_blob(blob, _unwrap(blob.envelope), name, user)


def test_metadata_and_header_are_authenticated() -> None:
    blob = seal_blob(SPKI, b"secret", "n", metadata={"team": "a"})
    body = bytearray(base64.urlsafe_b64decode(blob.to_text()[6:] + "=="))
    index = body.index(b"team") + 4 + 2
    body[index] ^= 1  # "a" -> "`": still valid text, another context
    forged = parse_token_blob("kmsp2:" + base64.urlsafe_b64encode(bytes(body)).decode().rstrip("="))
    with pytest.raises(BlobFormatError):
        open_blob(forged, _unwrap(forged.envelope), "n", None)


@pytest.mark.parametrize(
    "text",
    ["", "kmsp2:", "kmsp3:AAAA", "kmsk1:AAAA", "kmsp2:!!!!", "kmsp2:" + "A" * 100, "\xff"],
)
def test_malformed_blobs_are_refused_without_echo(text: str) -> None:
    with pytest.raises(BlobFormatError) as caught:
        parse_token_blob(text)
    assert text[6:] not in str(caught.value) or len(text) <= 6


def test_a_blob_records_its_name_and_user_and_a_mismatch_is_refused_before_the_token() -> None:
    from kmskeys.blobfields import BlobMismatchError

    blob = parse_token_blob(seal_blob(SPKI, b"secret", "db/password", user="alice").to_text())
    blob.check_request("db/password", "alice")
    for name, user in (("db/other", "alice"), ("db/password", "bob")):
        with pytest.raises(BlobMismatchError) as caught:
            blob.check_request(name, user)
        assert "encrypted for" in str(caught.value)
    # The check comes before any key is needed: no data key at all is given here.
    with pytest.raises(BlobMismatchError):
        open_blob(blob, b"", "db/other", "alice")
    unbound = parse_token_blob(seal_blob(SPKI, b"secret", "n").to_text())
    assert unbound.user is None and not unbound.binds_user
    unbound.check_request("n", "anyone")


def test_a_version_1_blob_is_refused_saying_to_encrypt_again() -> None:
    old = "kmsp1:" + seal_blob(SPKI, b"secret", "n").to_text()[6:]
    with pytest.raises(BlobFormatError) as caught:
        parse_token_blob(old)
    assert "encrypt the secret again" in str(caught.value)


def test_a_blob_never_carries_request_bound_keys() -> None:
    with pytest.raises(BlobFormatError):
        seal_blob(SPKI, b"x", "n", metadata={"kmskeys_user": "root"})


def test_a_sealed_keystore_key_is_bound_to_its_context() -> None:
    key = os.urandom(64)
    context = {"kmskeys_seal": "stored", "kmskeys_scope": "machine", "kmskeys_name": "k"}
    envelope = TokenEnvelope.from_bytes(seal_entry(SPKI, key, context).to_bytes())
    assert open_entry(envelope, _unwrap(envelope), context) == key
    with pytest.raises(BlobFormatError):
        open_entry(envelope, _unwrap(envelope), {**context, "kmskeys_name": "other"})
    with pytest.raises(BlobFormatError):
        TokenEnvelope.from_bytes(envelope.to_bytes()[:100])


def test_only_rsa_keys_of_2048_to_4096_bits() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    spki = small.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(BlobFormatError):
        seal_blob(spki, b"x", "n")


def test_the_encryptor_checks_its_input() -> None:
    blob = encrypt_to_token(b"s", "n", SPKI, user="alice")
    assert blob.binds_user
    with pytest.raises(InputError):
        encrypt_to_token(b"", "n", SPKI)
    with pytest.raises(InputError):
        encrypt_to_token(b"x" * 32768, "n", SPKI)


def test_pkcs11_uris() -> None:
    target = parse_pkcs11_uri("pkcs11:token=kms%20keys;object=seal?module-path=/usr/lib/p.so")
    assert (target.token, target.object, target.module) == ("kms keys", "seal", "/usr/lib/p.so")
    for bad in ("pkcs11:token=a", "pkcs11:token=a;token=b;object=c?module-path=/m",
                "pkcs11:token=a;object=b;pin-value=1234?module-path=/m", "file:x"):  # fmt: skip
        with pytest.raises(InputError):
            parse_pkcs11_uri(bad)
