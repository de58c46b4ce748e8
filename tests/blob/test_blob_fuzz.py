"""Hypothesis: parse_blob is total over hostile input, and every valid Blob round-trips."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmskeys.blob import Blob, BlobFormatError, BlobMismatchError, parse_blob

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


# Every version prefix, canonical or not: whatever is accepted must still write back exactly.
_PREFIXES = st.sampled_from(["kmsk1:", "kmsk2:", "kmsk01:", "kmsk02:", "kmsk002:", "kmsk0:"])
# Names and users as the recorded fields hold them (and as the validators accept them).
_NAME = st.from_regex(
    r"[A-Za-z0-9][A-Za-z0-9_@+-]{0,30}(/[A-Za-z0-9][A-Za-z0-9_@+-]{0,8})?", fullmatch=True
)
_USER = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,30}\$?", fullmatch=True)


@given(_PREFIXES, st.binary(max_size=400), st.booleans())
def test_any_body_after_the_prefix(prefix: str, body: bytes, allow_legacy: bool) -> None:
    _total(prefix + base64.urlsafe_b64encode(body).decode().rstrip("="), allow_legacy)


@st.composite
def blobs(draw: st.DrawFn) -> Blob:
    mode = draw(st.sampled_from(["direct", "envelope"]))
    envelope = mode == "envelope"
    version = draw(st.sampled_from([1, 2]))
    binds_user = draw(st.booleans())
    return Blob(
        version=version,
        mode=mode,
        key_arn=draw(st.text(alphabet="arn:aws:kms-0123456789/abcdef", min_size=1, max_size=80)),
        binds_user=binds_user,
        metadata=draw(st.dictionaries(_KEY, _VALUE, max_size=4)),
        ciphertext=draw(st.binary(min_size=1, max_size=300)),
        nonce=draw(st.binary(min_size=12, max_size=12)) if envelope else None,
        sealed=draw(st.binary(min_size=17, max_size=300)) if envelope else None,
        name=draw(_NAME) if version == 2 else None,
        user=draw(_USER) if version == 2 and binds_user else None,
    )


@given(blobs())
def test_valid_blobs_round_trip(blob: Blob) -> None:
    assert parse_blob(blob.to_text()) == blob
    # One identity for the blob and for its version-1 form: one host-cache entry for both.
    assert parse_blob(blob.identity()).identity() == blob.identity()


@given(blobs(), _NAME, st.one_of(st.none(), _USER))
def test_only_the_recorded_name_and_user_pass_the_check(
    blob: Blob, name: str, user: str | None
) -> None:
    try:
        blob.check_request(name, user)
    except BlobMismatchError as exc:
        assert blob.version == 2
        assert exc.reason.startswith("blob was encrypted for ")
        assert name != blob.name or (user is not None and user != blob.user)
        return
    assert blob.name in (None, name)
    assert blob.user is None or user in (None, blob.user)


@given(blobs(), st.integers(min_value=0), st.sampled_from("AZaz09-_+/=:. \x00é"))
def test_one_changed_character_is_a_blob_or_a_reason(blob: Blob, where: int, char: str) -> None:
    text = blob.to_text()
    i = where % len(text)
    _total(text[:i] + char + text[i + 1 :], False)


@given(blobs(), _PREFIXES, st.sampled_from(["", "\n", "\r\n", " ", "=", "==", "\t"]))
def test_a_valid_body_under_any_prefix_is_its_one_spelling_or_refused(
    blob: Blob, prefix: str, tail: str
) -> None:
    _total(prefix + blob.to_text().partition(":")[2] + tail, False)
