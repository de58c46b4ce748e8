"""Version 2: the recorded name and user, checked locally; and one canonical text per blob."""

from __future__ import annotations

import base64
import struct

import pytest

from kmskeys.blob import (
    CONTEXT_NAME,
    CONTEXT_USER,
    Blob,
    BlobFormatError,
    BlobMismatchError,
    parse_blob,
)
from kmskeys.errors import KmsKeysError
from tests.blob.test_blob_format import ARN, body_text, direct, envelope

pytestmark = pytest.mark.unit

URLSAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def v2_body(
    name: bytes = b"db", user: bytes | None = None, flags: int | None = None, mode: int = 1
) -> bytes:
    """A version-2 body laid out by hand, as docs/blob-format.md describes it."""
    flags = (0 if user is None else 1) if flags is None else flags
    out = struct.pack(">BBB", mode, flags, len(name)) + name
    if user is not None:
        out += struct.pack(">B", len(user)) + user
    arn = ARN.encode()
    return out + struct.pack(">H", len(arn)) + arn + b"\x00" + struct.pack(">H", 4) + b"ctxt"


def test_documented_v2_layout() -> None:
    blob = parse_blob(body_text(v2_body(b"app/db", b"www-data"), version=2))
    assert (blob.version, blob.name, blob.user, blob.binds_user) == (2, "app/db", "www-data", True)
    assert (blob.key_arn, blob.ciphertext) == (ARN, b"ctxt")
    machine = parse_blob(body_text(v2_body(b"db"), version=2))
    assert (machine.name, machine.user, machine.binds_user) == ("db", None, False)
    assert machine.to_text() == body_text(v2_body(b"db"), version=2)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (v2_body(name=b""), "not a valid secret name"),
        (v2_body(name=b"../etc"), "not a valid secret name"),
        (v2_body(name=b"a b"), "not a valid secret name"),
        (v2_body(name=b"\xffdb"), "recorded name is not ASCII"),
        (v2_body(user=b""), "user name is 1 to 255"),
        (v2_body(user=b"-x"), "user name"),
        (v2_body(user=b"\xe9"), "recorded user is not ASCII"),
        # Binds a user but records none: the ARN's length is read as the user, and so on.
        (v2_body(flags=1), "truncated"),
        (v2_body()[:3], "truncated recorded name"),
        (v2_body(b"x" * 200)[:150], "truncated recorded name"),
        (struct.pack(">BBB", 1, 1, 2) + b"db", "truncated recorded user length"),
        (struct.pack(">BB", 1, 0), "truncated recorded name length"),
    ],
)
def test_malformed_recorded_fields_give_one_reason(body: bytes, reason: str) -> None:
    with pytest.raises(BlobFormatError, match=reason):
        parse_blob(body_text(body, version=2))


def test_a_blob_for_another_name_is_refused_with_both_names() -> None:
    blob = direct(name="db-password")
    with pytest.raises(BlobMismatchError) as caught:
        blob.encryption_context("db-pasword", None)
    assert caught.value.reason == "blob was encrypted for 'db-password', not 'db-pasword'"
    assert str(caught.value) == caught.value.reason
    # Every handler of a bad blob catches it: a mismatch is a refusal of the blob.
    assert isinstance(caught.value, BlobFormatError)
    assert isinstance(caught.value, KmsKeysError)
    with pytest.raises(BlobMismatchError, match="'db-password', not 'db-pasword'"):
        blob.check_request("db-pasword", "alice")
    blob.check_request("db-password", "alice")  # binds no user: any user
    assert blob.encryption_context("db-password", "alice") == {CONTEXT_NAME: "db-password"}


def test_a_blob_for_another_user_is_refused_with_both_users() -> None:
    blob = envelope(binds_user=True, user="alice")
    with pytest.raises(BlobMismatchError, match="encrypted for user 'alice', not 'bob'"):
        blob.encryption_context("db", "bob")
    with pytest.raises(BlobMismatchError, match="encrypted for 'db', not 'web'"):
        blob.check_request("web", "alice")
    assert blob.encryption_context("db", "alice") == {CONTEXT_NAME: "db", CONTEXT_USER: "alice"}
    # A requester without a user name: the existing refusal, not a mismatch.
    blob.check_request("db", None)
    with pytest.raises(BlobFormatError, match="bound to a user") as caught:
        blob.encryption_context("db", None)
    assert not isinstance(caught.value, BlobMismatchError)


def test_version_1_blobs_record_nothing_and_keep_working() -> None:
    old = direct(version=1, binds_user=True)
    assert (old.name, old.user) == (None, None)
    old.check_request("anything", "anyone")  # nothing to check locally: KMS decides
    assert old.encryption_context("anything", "anyone") == {
        CONTEXT_NAME: "anything",
        CONTEXT_USER: "anyone",
    }


@pytest.mark.parametrize(
    "blob",
    [
        direct(),
        direct(binds_user=True),
        envelope(binds_user=True, metadata={"env": "prod"}),
        direct(version=1),
        envelope(version=1),
    ],
)
def test_identity_is_the_version_1_text(blob: Blob) -> None:
    identity = blob.identity()
    as_v1 = parse_blob(identity)
    assert as_v1.version == 1 and as_v1.to_text() == identity
    fields = ("mode", "key_arn", "binds_user", "metadata", "ciphertext", "nonce", "sealed")
    assert all(getattr(as_v1, f) == getattr(blob, f) for f in fields)
    # Every accepted spelling of the blob has the same identity (and the same text).
    text = blob.to_text()
    for spelling in (text, f"{text}\n", f"  {text}\r\n", f"\t{text} ", text.encode()):
        assert parse_blob(spelling).identity() == identity
        assert parse_blob(spelling).to_text() == text


def test_legacy_identity_is_its_text() -> None:
    text = base64.b64encode(b"\x05" * 150).decode()
    assert parse_blob(f"{text}\n", allow_legacy=True).identity() == text


def test_every_other_spelling_is_refused() -> None:
    text = direct(ciphertext=(bytes(range(256)) * 2)[:511]).to_text()
    head, body = text.split(":")
    assert "-" in body and "_" in body  # bytes 0..255 make both base64url-only characters
    padded = body + "=" * (-len(body) % 4)
    assert len(body) % 4 in (2, 3), "the sample must need padding"
    # The last character's unused low bits are zero; setting one is another spelling.
    loose_bits = body[:-1] + URLSAFE[URLSAFE.index(body[-1]) + 1]
    for spelling, reason in (
        (f"kmsk02:{body}", "non-canonical version prefix"),
        (f"kmsk0002:{body}", "non-canonical version prefix"),
        (f"{head}:{padded}", "not unpadded base64url"),
        (f"{head}:{body.translate(str.maketrans('-_', '+/'))}", "not unpadded base64url"),
        (f"{head}:{loose_bits}", "not canonical base64url"),
        (f"{head.upper()}:{body}", "unknown prefix"),
        (f"{head}: {body}", "not unpadded base64url"),
        (f"{head}:{body[:40]}\n{body[40:]}", "not unpadded base64url"),
    ):
        with pytest.raises(BlobFormatError, match=reason):
            parse_blob(spelling)
