"""kmskeys.blob: the one-line format, its invariants, and what it refuses."""

from __future__ import annotations

import base64
import struct
from datetime import UTC, datetime

import pytest

from kmskeys.blob import (
    CONTEXT_NAME,
    CONTEXT_NOT_AFTER,
    CONTEXT_USER,
    MAX_BLOB_CHARS,
    Blob,
    BlobFormatError,
    envelope_aad,
    format_not_after,
    parse_blob,
    parse_not_after,
)
from kmskeys.errors import KmsKeysError

pytestmark = pytest.mark.unit

ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def direct(**kw: object) -> Blob:
    """A version-2 direct blob made for `db` (and for `alice` when it binds a user)."""
    fields: dict[str, object] = {
        "version": 2,
        "mode": "direct",
        "key_arn": ARN,
        "binds_user": False,
        "metadata": {},
        "ciphertext": b"\x01" * 180,
        "name": "db",
    }
    fields.update(kw)
    if fields["version"] == 1:
        fields.setdefault("user", None)
        if "name" not in kw:
            fields["name"] = None
    elif fields["binds_user"] is True and "user" not in kw:
        fields["user"] = "alice"
    return Blob(**fields)  # type: ignore[arg-type]


def envelope(**kw: object) -> Blob:
    fields: dict[str, object] = {"mode": "envelope", "nonce": b"\x02" * 12, "sealed": b"\x03" * 40}
    fields.update(kw)
    return direct(**fields)


def body_text(body: bytes, version: int = 1) -> str:
    return f"kmsk{version}:" + base64.urlsafe_b64encode(body).decode().rstrip("=")


def raw_body(mode: int = 1, flags: int = 0, meta: list[tuple[bytes, bytes]] | None = None) -> bytes:
    arn = ARN.encode()
    out = struct.pack(">BBH", mode, flags, len(arn)) + arn
    meta = meta or []
    out += struct.pack(">B", len(meta))
    for k, v in meta:
        out += struct.pack(">B", len(k)) + k + struct.pack(">H", len(v)) + v
    return out + struct.pack(">H", 4) + b"ctxt"


@pytest.mark.parametrize(
    "blob",
    [
        direct(),
        direct(binds_user=True),
        direct(metadata={"env": "prod", CONTEXT_NOT_AFTER: "2030-01-02T03:04:05Z"}),
        envelope(),
        envelope(binds_user=True, metadata={"team": "pay ments é"}),
        direct(name="app/db.password@eu+1", binds_user=True, user="www-data"),
        direct(version=1),
        direct(version=1, binds_user=True),
        envelope(version=1, metadata={"team": "x"}),
    ],
)
def test_text_round_trip_is_exact(blob: Blob) -> None:
    text = blob.to_text()
    assert text.startswith(f"kmsk{blob.version}:")
    assert text.isascii() and "\n" not in text and "=" not in text
    parsed = parse_blob(text)
    assert parsed == blob
    assert parsed.to_text() == text
    assert parse_blob(f"  {text}\r\n".encode()) == blob
    assert parsed.size == len(text)


def test_legacy_only_when_allowed() -> None:
    text = base64.b64encode(b"\x05" * 150).decode()
    with pytest.raises(BlobFormatError, match="legacy"):
        parse_blob(text)
    blob = parse_blob(text, allow_legacy=True)
    assert (blob.mode, blob.version, blob.key_arn, blob.binds_user) == ("legacy", 0, None, False)
    assert blob.ciphertext == b"\x05" * 150
    assert blob.to_text() == text
    assert blob.encryption_context("db", "alice") == {}


def test_kmskeys_blobs_parse_with_legacy_allowed_too() -> None:
    blob = direct()
    assert parse_blob(blob.to_text(), allow_legacy=True) == blob


def test_encryption_context_takes_name_and_user_from_the_request() -> None:
    blob = direct(binds_user=True, metadata={"env": "prod"})
    assert blob.encryption_context("db", "alice") == {
        CONTEXT_NAME: "db",
        CONTEXT_USER: "alice",
        "env": "prod",
    }
    with pytest.raises(BlobFormatError, match="bound to a user"):
        blob.encryption_context("db", None)
    with pytest.raises(BlobFormatError, match="name"):
        blob.encryption_context("", None)
    assert direct().encryption_context("db", "alice") == {CONTEXT_NAME: "db"}


@pytest.mark.parametrize("key", [CONTEXT_NAME.encode(), CONTEXT_USER.encode()])
def test_blob_carrying_request_bound_keys_is_refused(key: bytes) -> None:
    with pytest.raises(BlobFormatError, match="request-bound"):
        parse_blob(body_text(raw_body(meta=[(key, b"mallory")])))


def test_constructor_refuses_request_bound_metadata() -> None:
    with pytest.raises(BlobFormatError, match="reserved"):
        direct(metadata={CONTEXT_NAME: "x"})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("kmsk1:", "no body"),
        ("kmsk3:AAAA", "unsupported blob version 3"),
        ("kmsk0:AAAA", "unsupported blob version 0"),
        ("kmsk01:AAAA", "non-canonical version prefix"),
        ("kmsk002:AAAA", "non-canonical version prefix"),
        ("kmsk00:AAAA", "non-canonical version prefix"),
        ("kmsk00001:AAAA", "malformed version"),
        ("kmsk+1:AAAA", "malformed version"),
        ("kmsk 1:AAAA", "malformed version"),
        ("KMSK1:AAAA", "unknown prefix"),
        ("kmskx:AAAA", "malformed version"),
        ("kmsk:AAAA", "malformed version"),
        ("other:AAAA", "unknown prefix"),
        ("kmsk1:AA AA", "not unpadded base64url"),
        ("kmsk1:AAAA==", "not unpadded base64url"),
        ("kmsk1:A+/A", "not unpadded base64url"),
        ("kmsk1:AAAAA", "impossible base64 length"),
        ("kmsk1:AB", "not canonical"),
        ("kmsk1:AA", "unknown mode"),
        ("kmsk1:AQ", "truncated flags"),
        ("kmsk1:é", "not ASCII"),
        ("AAAA", "not a kmskeys blob"),
    ],
)
def test_malformed_text_gives_one_reason(text: str, reason: str) -> None:
    with pytest.raises(BlobFormatError, match=reason) as caught:
        parse_blob(text)
    assert isinstance(caught.value, KmsKeysError)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (raw_body(mode=3), "unknown mode"),
        (raw_body(flags=4), "unknown flags"),
        (raw_body() + b"x", "trailing bytes"),
        (raw_body()[:-1], "truncated ciphertext"),
        (raw_body(meta=[(b"b", b"1"), (b"a", b"2")]), "ascending"),
        (raw_body(meta=[(b"a", b"1"), (b"a", b"2")]), "ascending"),
        (raw_body(meta=[(b"kmskeys_other", b"1")]), "reserved"),
        (raw_body(meta=[(b"k", b"\xff")]), "not valid text"),
        (raw_body(meta=[(b"k", b"")]), "non-empty"),
        (raw_body(meta=[(CONTEXT_NOT_AFTER.encode(), b"2030-13-01T00:00:00Z")]), "real date"),
        (raw_body(mode=2), "truncated envelope nonce"),
        (raw_body(mode=2) + b"n" * 12 + b"t" * 16, "sealed part"),
    ],
)
def test_malformed_body_gives_one_reason(body: bytes, reason: str) -> None:
    with pytest.raises(BlobFormatError, match=reason):
        parse_blob(body_text(body))


def test_oversized_input_is_refused_before_decoding() -> None:
    big_text = "kmsk1:" + "A" * MAX_BLOB_CHARS
    with pytest.raises(BlobFormatError, match="longer than"):
        parse_blob(big_text)
    # Non-ASCII bytes past the limit: refused for length, so no decoding was attempted.
    with pytest.raises(BlobFormatError, match="longer than"):
        parse_blob(b"\xff" * (MAX_BLOB_CHARS + 1))


def test_non_text_input_is_a_format_error() -> None:
    with pytest.raises(BlobFormatError):
        parse_blob(12345)  # type: ignore[arg-type]


def test_errors_never_echo_the_blob() -> None:
    text = direct(ciphertext=b"kmst-distinctive-ciphertext" * 4).to_text()
    for broken in (text[:-3], text + "!", text.replace("kmsk2:", "kmsk9:"), text[6:]):
        with pytest.raises(BlobFormatError) as caught:
            parse_blob(broken)
        message = str(caught.value)
        body = broken.partition(":")[2] or broken
        assert all(body[i : i + 12] not in message for i in range(0, len(body) - 12, 6))


def test_envelope_aad_binds_header_and_context() -> None:
    blob = envelope(binds_user=True, metadata={"env": "prod"})
    context = blob.encryption_context("db", "alice")
    aad = envelope_aad(blob, context)
    assert aad == envelope_aad(parse_blob(blob.to_text()), dict(reversed(context.items())))
    changed = envelope(binds_user=True, metadata={"env": "dev"})
    others = [
        envelope_aad(changed, changed.encryption_context("db", "alice")),
        envelope_aad(blob, {**context, CONTEXT_NAME: "db2"}),
        envelope_aad(blob, {**context, CONTEXT_USER: "bob"}),
        envelope_aad(envelope(binds_user=True, key_arn=ARN + "0"), context),
        envelope_aad(envelope(binds_user=False), context),
    ]
    assert len({aad, *others}) == 1 + len(others)
    with pytest.raises(BlobFormatError):
        envelope_aad(direct(), context)
    # The recorded name and user are no part of the seal: the version-1 form opens alike.
    assert envelope_aad(parse_blob(blob.identity()), context) == aad


def test_documented_aad_layout() -> None:
    blob = envelope(metadata={})
    aad = envelope_aad(blob, {CONTEXT_NAME: "db"})
    arn = ARN.encode()
    expected = (
        b"kmsk-envelope-aad"
        + struct.pack(">BBH", 1, 0, len(arn))
        + arn
        + b"\x01"
        + b"\x0ckmskeys_name\x00\x02db"
    )
    assert aad == expected


def test_not_after_round_trip_and_strictness() -> None:
    when = datetime(2031, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert format_not_after(when) == "2031-12-31T23:59:59Z"
    assert parse_not_after("2031-12-31T23:59:59Z") == when
    assert direct(metadata={CONTEXT_NOT_AFTER: "2031-12-31T23:59:59Z"}).not_after == when
    assert direct().not_after is None
    for bad in (
        "2031-12-31",
        "2031-12-31T23:59:59",
        "2031-12-31 23:59:59Z",
        "2031-02-30T00:00:00Z",
    ):
        with pytest.raises(BlobFormatError):
            parse_not_after(bad)
    with pytest.raises(ValueError):
        format_not_after(datetime(2031, 1, 1))


@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "weird"},
        {"version": 3},
        {"version": 0},
        {"name": None},
        {"name": ""},
        {"name": "../etc"},
        {"name": "a b"},
        {"name": b"db"},
        {"version": 1, "name": "db"},
        {"version": 1, "binds_user": True, "user": "alice"},
        {"user": "alice"},
        {"binds_user": True, "user": None},
        {"binds_user": True, "user": "-alice"},
        {"binds_user": True, "user": "a" * 256},
        {"binds_user": True, "user": "al ice"},
        {"key_arn": None},
        {"key_arn": ""},
        {"key_arn": "has space"},
        {"ciphertext": b""},
        {"ciphertext": b"x" * 6145},
        {"nonce": b"x" * 12},
        {"metadata": {f"k{i}": "v" for i in range(17)}},
    ],
)
def test_constructor_enforces_invariants(kw: dict[str, object]) -> None:
    with pytest.raises(BlobFormatError):
        direct(**kw)


def test_blob_is_frozen_and_hashable() -> None:
    blob = direct(metadata={"b": "2", "a": "1"})
    assert list(blob.metadata) == ["a", "b"]
    assert hash(blob) == hash(parse_blob(blob.to_text()))
    with pytest.raises(AttributeError):
        blob.mode = "envelope"  # type: ignore[misc]
    with pytest.raises(TypeError):
        blob.metadata["c"] = "3"  # type: ignore[index]


def test_blob_module_stays_stdlib_only() -> None:
    import subprocess
    import sys

    code = (
        "import sys, kmskeys.blob; "
        "bad = [m for m in ('boto3', 'botocore', 'cryptography') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
