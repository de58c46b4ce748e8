"""The protect blob format, held to known answers: blobs of fixed inputs (master key, salt, nonce
prefix, uid) must come out byte for byte as the first implementation wrote them, through every
path the stream API has (bytes in memory, an io.BytesIO, a file object it reads into buffers).

The master key and the randomness are fixed here instead of asked of the kernel, so this is a
unit test of the format; tests/stored/test_dpapi.py covers the real keystore end to end.
"""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from kmskeys import dpapi, dpapi_chunks
from kmskeys.errors import ProtectAuthenticationError, TruncatedProtectBlobError
from kmskeys.protectblob import from_text

pytestmark = pytest.mark.unit

MASTER = bytes(range(32))
RANDOM = bytes(range(100, 139))  # 32 bytes of salt, then 7 of nonce prefix
DATA = bytes(i * 7 % 256 for i in range(10_000))
# Written by the implementation of commit 4d96c27 (before the stream API stopped copying).
STREAM_BLOB = (10123, "0c17dc102dcd0afcd325ceda51be578d2e134b02ac210a4933538caaab1a568c")
TEXT_BLOB = (
    "kmsdp1:a21zZHBhcGkBAgAAAAP_____ABAAAGRlZmdoaWprbG1ub3BxcnN0dXZ3eHl6e3x9fn-AgYKDhIWGh4iJigdkZ"
    "WZhdWx0AAD2KvpprzZMbATZYBmxMEA1Po6Gt0Za43-e"
)


class FileLike:
    """A reader that is no io.BytesIO, so the stream API reads it into buffers of its own."""

    def __init__(self, data: bytes) -> None:
        self.inner = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self.inner.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        return self.inner.readinto(buffer)


@pytest.fixture(autouse=True)
def fixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dpapi, "latest_version", lambda name, scope, prefix="stored": 3)
    monkeypatch.setattr(dpapi, "master_key", lambda name, scope, version, prefix="": MASTER)
    monkeypatch.setattr(dpapi, "fsuid", lambda: 1234)
    monkeypatch.setattr(os, "urandom", lambda n: RANDOM[:n])


def _protect(src: dpapi_chunks.Reader) -> bytes:
    out = io.BytesIO()
    dpapi.protect_stream(
        src, out, name="app/db", entropy=b"pepper", description="d\u00e9mo", chunk_size=4096
    )
    return out.getvalue()


@pytest.mark.parametrize("source", ["BytesIO", "file object"])
def test_a_stream_blob_is_byte_for_byte_the_known_one(source: str) -> None:
    src = io.BytesIO(DATA) if source == "BytesIO" else FileLike(DATA)
    blob = _protect(src)
    assert (len(blob), hashlib.sha256(blob).hexdigest()) == STREAM_BLOB
    for reader in (io.BytesIO(blob), FileLike(blob)):
        out = io.BytesIO()
        header = dpapi.unprotect_stream(reader, out, entropy=b"pepper")
        assert out.getvalue() == DATA
        assert (header.name, header.key_version, header.uid) == ("app/db", 3, 1234)
        assert header.description == "d\u00e9mo"
    assert dpapi.unprotect(blob, entropy=b"pepper") == DATA


def test_a_text_blob_is_the_known_one() -> None:
    assert dpapi.protect(b"one chunk", name="default", scope="machine") == TEXT_BLOB
    assert dpapi.unprotect(TEXT_BLOB) == b"one chunk"


def test_a_one_chunk_stream_in_memory_is_the_known_blob() -> None:
    # protect_stream seals one chunk in memory on its own path: the same bytes as protect's.
    out = io.BytesIO()
    dpapi.protect_stream(io.BytesIO(b"one chunk"), out, name="default", scope="machine")
    assert out.getvalue() == from_text(TEXT_BLOB)
    back = io.BytesIO()
    dpapi.unprotect_stream(io.BytesIO(out.getvalue()), back)
    assert back.getvalue() == b"one chunk"


def _recording_take(monkeypatch: pytest.MonkeyPatch) -> list[bytearray]:
    """The buffers unprotect_stream takes for plaintext, kept to look at after it returns."""
    taken: list[bytearray] = []

    def take(size: int) -> bytearray:
        taken.append(dpapi_chunks.take(size))
        return taken[-1]

    monkeypatch.setattr(dpapi, "take", take)
    return taken


def test_one_chunk_in_memory_is_opened_into_a_buffer_wiped_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blob = _protect(io.BytesIO(DATA[:4000]))  # one chunk of 4096
    taken = _recording_take(monkeypatch)
    out = io.BytesIO()
    dpapi.unprotect_stream(io.BytesIO(blob), out, entropy=b"pepper")
    assert out.getvalue() == DATA[:4000]
    assert [len(buf) for buf in taken] == [4096]
    assert not any(taken[0]), "plaintext left in the buffer"


@pytest.mark.parametrize("damage", ["one bit", "cut after a full chunk"])
def test_a_damaged_chunk_in_memory_releases_nothing(
    monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    blob = bytearray(_protect(io.BytesIO(DATA[:8192])))  # two full chunks of 4096
    if damage == "one bit":
        del blob[-4112:]  # the first chunk alone is then the last: one bit of it flipped too
        blob[-1] ^= 1
        expected: type[Exception] = ProtectAuthenticationError
    else:
        del blob[-4112:]  # a whole chunk missing: the first now ends the blob
        expected = TruncatedProtectBlobError
    taken = _recording_take(monkeypatch)
    out = io.BytesIO()
    with pytest.raises(expected) as raised:
        dpapi.unprotect_stream(io.BytesIO(bytes(blob)), out, entropy=b"pepper")
    assert (type(raised.value) is TruncatedProtectBlobError) == (damage != "one bit")
    assert out.getvalue() == b""
    assert not any(taken[0]), "unauthenticated plaintext left in the buffer"


def test_a_bytesio_is_read_where_it_stands_and_left_at_its_end() -> None:
    src = io.BytesIO(b"skipped" + DATA)
    src.seek(7)
    blob = _protect(src)
    assert hashlib.sha256(blob).hexdigest() == STREAM_BLOB[1]
    assert src.tell() == 7 + len(DATA)
    src.write(b"more")  # no view of its buffer is left behind
    ciphertext = io.BytesIO(b"x" + blob)
    ciphertext.seek(1)
    out = io.BytesIO()
    dpapi.unprotect_stream(ciphertext, out, entropy=b"pepper")
    assert out.getvalue() == DATA and ciphertext.tell() == 1 + len(blob)


def test_a_bytesio_whose_buffer_is_exported_is_read_into_buffers_of_ours() -> None:
    # getvalue() would copy it (plaintext in a bytes object nobody can wipe): read it instead.
    src = io.BytesIO(DATA)
    with src.getbuffer():
        blob = _protect(src)
    assert hashlib.sha256(blob).hexdigest() == STREAM_BLOB[1]
    assert src.tell() == len(DATA)


def test_the_plaintext_buffers_are_wiped_once_done() -> None:
    blob = _protect(io.BytesIO(DATA))
    dpapi.unprotect_stream(FileLike(blob), io.BytesIO(), entropy=b"pepper")
    _protect(FileLike(DATA))
    pooled = dpapi_chunks.POOL
    assert pooled, "the stream buffers went back to the pool"
    assert all(not any(buf) for buf in pooled if len(buf) == 4096), "plaintext left in a buffer"
