"""Pure pieces of the keystore and DPAPI: the description grammar, config, entries, sizes, blobs."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmskeys.errors import InvalidNameError, NotAProtectBlobError
from kmskeys.protectblob import (
    MAX_CHUNK,
    MIN_CHUNK,
    NO_UID,
    ProtectHeader,
    chunk_nonce,
    from_text,
    read_header,
    to_text,
)
from kmskeys.stored import StoredQuery, parse_qualifier, split_qualifier, stored_description
from resolver import config as config_mod
from resolver.errors import ConfigError, CorruptEntryError, RefusedError
from resolver.keystore import Entry, EntryId
from resolver.keystore_entry import parse_flat_name, parse_name_dir, parse_version
from resolver.registry import split_description
from resolver.stored import parse_size

pytestmark = pytest.mark.unit

NAMES = st.from_regex(
    r"[A-Za-z0-9][A-Za-z0-9_@+-]{0,20}(/[A-Za-z0-9][A-Za-z0-9_.@+-]{0,8}){0,3}", fullmatch=True
).filter(lambda n: ".." not in n)


# --- the description grammar --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qualifier", "query"),
    [
        ("", StoredQuery("key")),
        ("#user", StoredQuery("key", "user")),
        ("#machine#v3", StoredQuery("key", "machine", 3)),
        ("#v2147483647", StoredQuery("key", None, 2**31 - 1)),
        ("#latest", StoredQuery("latest")),
        ("#user#latest", StoredQuery("latest", "user")),
        ("#scope", StoredQuery("scope")),
    ],
)
def test_qualifiers(qualifier: str, query: StoredQuery) -> None:
    assert parse_qualifier(qualifier) == query
    assert parse_qualifier(query.qualifier()) == query


@pytest.mark.parametrize(
    "qualifier",
    [
        "#v0",
        "#v01",
        "#v2147483648",
        "#V2",
        "#v 2",
        "#v٣",
        "#user#user",
        "#machine#scope",
        "x",
        "##",
        "#latest#latest",
    ],
)
def test_bad_qualifiers(qualifier: str) -> None:
    with pytest.raises(InvalidNameError):
        parse_qualifier(qualifier)


@given(NAMES, st.sampled_from([None, "user", "machine"]), st.integers(1, 2**31 - 1))
def test_descriptions_round_trip(name: str, scope: str | None, version: int) -> None:
    query = StoredQuery("key", scope, version)
    desc = stored_description("stored", name, query)
    rest = desc.removeprefix("stored:")
    back_name, qualifier = split_qualifier(rest)
    assert back_name == name and parse_qualifier(qualifier) == query


def test_registry_splits_by_prefix() -> None:
    config = config_mod.parse({"prefix": "kms", "stored_prefix": "stored"})
    assert split_description(config, "stored:app/db#machine#v2") == (
        "stored",
        "app/db",
        "#machine#v2",
    )
    assert split_description(config, "kms:app/db") == ("kms", "app/db", "")
    for bad in ("kms:app#v2", "other:x", "stored:../x"):
        with pytest.raises(InvalidNameError):
            split_description(config, bad)


# --- config -------------------------------------------------------------------------------------


def test_stored_config() -> None:
    config = config_mod.parse_text(
        b'stored_prefix = "dpapi"\nkeystore_dir = "/srv/ks"\n'
        b'[stored."shared/*"]\nscope = "machine"\nallow_users = ["www-data", 33]\nttl = 60\n'
        b'[names."shared/*"]\nallow_users = ["nobody"]\n'
    )
    assert (config.stored_prefix, config.keystore_dir) == ("dpapi", Path("/srv/ks"))
    assert config.scope_for("shared/x") == "machine" and config.scope_for("other") == "user"
    assert config.ttl_for("shared/x", "dpapi") == 60 and config.ttl_for("shared/x") == 300
    rule = config.rule_for("shared/x", "dpapi")
    assert rule is not None and rule.allows("www-data", 1) and not rule.allows("nobody", 65534)
    kms_rule = config.rule_for("shared/x")
    assert kms_rule is not None and kms_rule.allows("nobody", 65534)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b'[names."x"]\nscope = "machine"\n', "unknown key 'scope'"),
        (b'[stored."x"]\nscope = "host"\n', "scope must be one of user, machine"),
        (b'[stored."x"]\nsize = 32\n', "unknown key 'size'"),
        (b'[stored."x"]\nkey_size = 15\n', "key_size"),
        (b'[names."x"]\nkey_size = 32\n', "unknown key 'key_size'"),
        (b"keystore_entries_per_uid = 0\n", "keystore_entries_per_uid"),
        (b"keystore_bytes_per_uid = 100\n", "keystore_bytes_per_uid"),
        (b'stored_prefix = "kms"\n', "stored_prefix must differ"),
        (b'seal = "kms"\nseal_key_arn = "arn:aws:kms:us-east-1:111122223333:key/k"\n', "seal_host"),
        (b'seal = "tpm"\n', "seal must be one of none, kms"),
        (b'keystore_dir = "var/lib"\n', "absolute path"),
        (b'stored_prefix = "Stored"\n', "prefix"),
    ],
)
def test_bad_stored_config(text: bytes, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_mod.parse_text(text)
    assert error in caught.value.reason


# --- keystore entries ---------------------------------------------------------------------------


def _entry(**changes: object) -> Entry:
    values: dict[str, object] = {
        "id": EntryId("user", 1000, "app/db", 2),
        "created": 1_700_000_000,
        "key_size": 32,
        "seal": "none",
        "material": bytes(range(32)),
    }
    values.update(changes)
    return Entry(**values)  # type: ignore[arg-type]


def test_entry_round_trip_and_name() -> None:
    entry = _entry()
    assert entry.id.directory() == ("user", "1000")
    assert (entry.id.name_dir(), entry.id.file_name()) == ("app:db", "2")
    assert entry.id.shown() == "user/1000/app:db/2" and entry.id.flat_name() == "app:db#2"
    assert Entry.decode(entry.encode(), entry.id, "t") == entry
    assert parse_flat_name("app:db#2") == ("app/db", 2)
    assert (parse_name_dir("app:db"), parse_version("2")) == ("app/db", 2)
    for stray in (".tmp-1-ab", "app:db#02", "app:db#0", "app:db", "..#1", "a#99999999999"):
        assert parse_flat_name(stray) is None
    for stray in (".account", ".tmp-1-ab", "..", "a#1", ""):
        assert parse_name_dir(stray) is None
    for stray in ("02", "0", "", "99999999999", ".tmp-1-ab", "1a"):
        assert parse_version(stray) is None
    sealed = _entry(seal="kms", material=b"\x01" * 180, seal_key_arn="arn:aws:kms:r:1:key/k")
    assert Entry.decode(sealed.encode(), sealed.id, "t") == sealed
    assert "material" not in repr(sealed) and "\\x01" not in repr(sealed)


@given(st.binary(max_size=400))
def test_entry_decode_is_total(data: bytes) -> None:
    try:
        Entry.decode(data, EntryId("machine", None, "x", 1), "t")
    except CorruptEntryError as exc:
        assert "corrupt" in exc.reason


@given(st.integers(0, 200), st.integers(0, 7))
def test_every_single_bit_flip_is_caught(position: int, bit: int) -> None:
    raw = bytearray(_entry().encode())
    raw[position % len(raw)] ^= 1 << bit
    with pytest.raises(CorruptEntryError):
        Entry.decode(bytes(raw), _entry().id, "t")


def test_entry_elsewhere_is_refused() -> None:
    entry = _entry()
    with pytest.raises(CorruptEntryError) as caught:
        Entry.decode(entry.encode(), EntryId("user", 1001, "app/db", 2), "t")
    assert "it holds user:1000/app/db#v2" in caught.value.reason


@pytest.mark.parametrize(("callout", "size"), [(b"", 32), (b"16", 16), (b"4096", 4096)])
def test_sizes(callout: bytes, size: int) -> None:
    assert parse_size(callout) == size


@pytest.mark.parametrize("callout", [b"15", b"4097", b"0", b"032", b"32 ", b"+32", b"\xff", b"1e3"])
def test_bad_sizes(callout: bytes) -> None:
    with pytest.raises(RefusedError):
        parse_size(callout)


# --- the protect blob parser (hypothesis) -------------------------------------------------------

HEADERS = st.builds(
    ProtectHeader,
    scope=st.just("user"),
    name=NAMES,
    key_version=st.integers(1, 2**31 - 1),
    uid=st.integers(0, NO_UID - 1),
    chunk_size=st.integers(MIN_CHUNK, MAX_CHUNK),
    salt=st.binary(min_size=32, max_size=32),
    nonce_prefix=st.binary(min_size=7, max_size=7),
    description=st.text(max_size=60).filter(str.isprintable),
) | st.builds(
    ProtectHeader,
    scope=st.just("machine"),
    name=NAMES,
    key_version=st.integers(1, 2**31 - 1),
    uid=st.none(),
    chunk_size=st.integers(MIN_CHUNK, MAX_CHUNK),
    salt=st.binary(min_size=32, max_size=32),
    nonce_prefix=st.binary(min_size=7, max_size=7),
    description=st.text(max_size=60).filter(str.isprintable),
)


def _parse(data: bytes) -> tuple[ProtectHeader, bytes]:
    return read_header(io.BytesIO(data).read)


@given(HEADERS, st.binary(max_size=50))
def test_header_round_trip(header: ProtectHeader, rest: bytes) -> None:
    raw = header.encode()
    assert _parse(raw + rest) == (header, raw)
    assert from_text(to_text(raw + rest)) == raw + rest


@given(st.binary(max_size=300))
def test_parser_is_total_over_bytes(data: bytes) -> None:
    try:
        header, raw = _parse(data)
    except NotAProtectBlobError as exc:
        assert str(exc).startswith("not a protect blob")
        return
    assert data.startswith(raw) and header.encode() == raw


@given(HEADERS, st.integers(0, 400), st.integers(1, 255))
def test_parser_on_damaged_headers(header: ProtectHeader, position: int, xor: int) -> None:
    raw = bytearray(header.encode())
    raw[position % len(raw)] ^= xor
    try:
        parsed, got = _parse(bytes(raw))
    except NotAProtectBlobError:
        return
    # A damaged header that still parses is a different, canonical header: its key differs.
    assert parsed != header and parsed.encode() == got


@given(st.text(max_size=200))
def test_text_form_is_total(text: str) -> None:
    for candidate in (text, "kmsdp1:" + text):
        try:
            data = from_text(candidate)
        except NotAProtectBlobError:
            continue
        assert to_text(data) == candidate.strip(" \t\r\n")


def test_messages_never_repeat_input() -> None:
    secret_looking = b"kmsdpapi" + os.urandom(8) + b"TOPSECRET" * 20
    with pytest.raises(NotAProtectBlobError) as caught:
        _parse(secret_looking)
    assert "TOPSECRET" not in str(caught.value)


def test_nonces_are_distinct_per_chunk_and_flag() -> None:
    prefix = b"\x00" * 7
    nonces = {chunk_nonce(prefix, i, last) for i in (0, 1, 2**32 - 1) for last in (False, True)}
    assert len(nonces) == 6 and all(len(n) == 12 for n in nonces)
    with pytest.raises(ValueError):
        chunk_nonce(prefix, 2**32, True)
