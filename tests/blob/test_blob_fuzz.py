"""Hypothesis: parse_blob is total over hostile input, and every valid Blob round-trips."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmskeys.blob import Blob, BlobFormatError, parse_blob

pytestmark = pytest.mark.fuzz

_KEY = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.:/@+-", min_size=1, max_size=20
).filter(lambda k: not k.startswith("kmskeys_"))
_VALUE = st.text(min_size=1, max_size=30).filter(str.isprintable)


def _total(text: str | bytes, allow_legacy: bool) -> None:
    try:
        blob = parse_blob(text, allow_legacy=allow_legacy)
    except BlobFormatError as exc:
        assert exc.reason
        return
    # Anything accepted is canonical: writing it back gives the (stripped) input.
    stripped = text.strip(b" \t\r\n" if isinstance(text, bytes) else " \t\r\n")
    assert blob.to_text() == (stripped.decode() if isinstance(stripped, bytes) else stripped)


@given(st.text(max_size=300), st.booleans())
def test_any_text(text: str, allow_legacy: bool) -> None:
    _total(text, allow_legacy)


@given(st.binary(max_size=300), st.booleans())
def test_any_bytes(data: bytes, allow_legacy: bool) -> None:
    _total(data, allow_legacy)


@given(st.binary(max_size=400), st.booleans())
def test_any_body_after_the_prefix(body: bytes, allow_legacy: bool) -> None:
    _total("kmsk1:" + base64.urlsafe_b64encode(body).decode().rstrip("="), allow_legacy)


@st.composite
def blobs(draw: st.DrawFn) -> Blob:
    mode = draw(st.sampled_from(["direct", "envelope"]))
    envelope = mode == "envelope"
    return Blob(
        version=1,
        mode=mode,
        key_arn=draw(st.text(alphabet="arn:aws:kms-0123456789/abcdef", min_size=1, max_size=80)),
        binds_user=draw(st.booleans()),
        metadata=draw(st.dictionaries(_KEY, _VALUE, max_size=4)),
        ciphertext=draw(st.binary(min_size=1, max_size=300)),
        nonce=draw(st.binary(min_size=12, max_size=12)) if envelope else None,
        sealed=draw(st.binary(min_size=17, max_size=300)) if envelope else None,
    )


@given(blobs())
def test_valid_blobs_round_trip(blob: Blob) -> None:
    assert parse_blob(blob.to_text()) == blob


@given(blobs(), st.integers(min_value=0), st.sampled_from("AZaz09-_+/=:. \x00é"))
def test_one_changed_character_is_a_blob_or_a_reason(blob: Blob, where: int, char: str) -> None:
    text = blob.to_text()
    i = where % len(text)
    _total(text[:i] + char + text[i + 1 :], False)
