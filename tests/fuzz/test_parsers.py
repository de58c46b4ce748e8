"""Hypothesis, 10,000 examples each: every parser either succeeds or raises its defined error.

The parsers that see hostile input: the blob parser (callouts and blob files), the name
validator (key descriptions), the `.env` bundle parser (build side) and the resolver's TOML
config loader. Pure and in-process, so each run stays within seconds.

Hypothesis's own bookkeeping per drawn choice costs far more than these parsers, so the
strategies are built once and draw few choices: a sequence of pieces is one byte string, a
byte per piece (`_pieces`), instead of a list with two choices per element. It covers the same
inputs, shrinks the same way (fewer pieces, earlier pieces) and a failure still shows the
joined input.
"""

from __future__ import annotations

import base64
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encryptor.bundle import parse_envfile
from encryptor.errors import InputError
from kmskeys.blob import Blob, BlobFormatError, parse_blob
from kmskeys.errors import InvalidNameError
from kmskeys.names import MAX_NAME_BYTES, parse_description, validate_name
from resolver.config import Config, parse, parse_text
from resolver.errors import ConfigError

pytestmark = pytest.mark.fuzz

TEN_THOUSAND = settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
_T = TypeVar("_T")
NAME_ALPHABET = string.ascii_letters + string.digits + "_./@+-"


def _pieces(pieces: Sequence[_T], max_size: int | None = None) -> st.SearchStrategy[list[_T]]:
    """Lists of up to `max_size` of `pieces`, drawn as a single choice: one byte per piece."""
    table = list(pieces)
    return st.binary(max_size=max_size).map(lambda drawn: [table[b % len(table)] for b in drawn])


# -- blob parser ----------------------------------------------------------------------------

_SAMPLE_BLOB = Blob(
    version=2,
    mode="envelope",
    key_arn="arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    binds_user=True,
    metadata={"kmskeys_not_after": "2030-01-01T00:00:00Z", "team": "db"},
    ciphertext=bytes(range(200)),
    nonce=b"\x01" * 12,
    sealed=b"\x02" * 40,
    name="app/db-password",
    user="www-data",
)
# The current version and the version-1 form every older blob has.
_SAMPLES = [_SAMPLE_BLOB.to_text().encode(), _SAMPLE_BLOB.identity().encode()]
# Canonical prefixes and other spellings of them: only the canonical ones may be accepted.
_PREFIXES = ["kmsk1:", "kmsk2:", "kmsk01:", "kmsk02:", "kmsk002:", "kmsk0:", "kmsk3:"]


def _flip_bit(which: int, bit: int) -> bytes:
    raw = bytearray(_SAMPLES[which])
    bit %= len(raw) * 8
    raw[bit // 8] ^= 1 << (bit % 8)
    return bytes(raw)


def _after(prefix: int, body: bytes) -> str:
    return _PREFIXES[prefix] + base64.urlsafe_b64encode(body).decode().rstrip("=")


# Random text, random bodies after any prefix, valid blobs with one bit flipped, and valid
# bodies under any prefix.
_BLOB_TEXTS: st.SearchStrategy[str | bytes] = st.one_of(
    st.text(max_size=400),
    st.binary(max_size=400),
    st.builds(_after, st.integers(0, len(_PREFIXES) - 1), st.binary(max_size=600)),
    st.builds(_flip_bit, st.integers(0, 1), st.integers(0, len(_SAMPLES[0]) * 8 - 1)),
    st.builds(
        lambda prefix, which: _PREFIXES[prefix] + _SAMPLES[which].decode().partition(":")[2],
        st.integers(0, len(_PREFIXES) - 1),
        st.integers(0, 1),
    ),
)


@TEN_THOUSAND
@given(_BLOB_TEXTS, st.booleans())
def test_blob_parser_is_total(text: str | bytes, allow_legacy: bool) -> None:
    try:
        blob = parse_blob(text, allow_legacy=allow_legacy)
    except BlobFormatError as exc:
        assert exc.reason and len(str(exc)) < 300  # says why, never repeats the input
        return
    # Accepted means canonical: the blob writes back to exactly the (stripped) input.
    stripped = text.strip(b" \t\r\n") if isinstance(text, bytes) else text.strip(" \t\r\n")
    expected = stripped if isinstance(stripped, bytes) else stripped.encode()
    assert blob.to_text().encode() == expected


# -- name validator -------------------------------------------------------------------------


# Mostly-valid names with the dangerous pieces mixed in; long runs cross the 200-byte limit.
_NAME_PIECES = _pieces(
    ["..", "/", "//", ".", "a", "Z9", "-", "@", "%s", "\x00", "é", " ", "x" * 60, "b" * 99],
    max_size=12,
)


_NAMES: st.SearchStrategy[str | bytes] = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    _NAME_PIECES.map("".join),
    _NAME_PIECES.map(lambda pieces: "".join(pieces).encode("utf-8")),
)


@TEN_THOUSAND
@given(_NAMES)
def test_name_validator_is_total_and_strict(name: str | bytes) -> None:
    try:
        valid = validate_name(name)
    except InvalidNameError:
        return
    # Whatever passes is a safe path below blob_dir and a plain key description.
    assert 0 < len(valid.encode()) <= MAX_NAME_BYTES
    assert valid[0].isascii() and valid[0].isalnum()
    assert set(valid) <= set(NAME_ALPHABET)
    assert ".." not in valid
    assert all(segment not in ("", ".") for segment in valid.split("/"))
    assert parse_description(f"kms:{valid}") == valid


# -- .env bundle parser ---------------------------------------------------------------------

_VALUE_TOKEN = "kmstVALUE"


_ENV_FRAGMENTS = _pieces(
    ["\n", "\r\n", "\r", "\ufeff", "export ", "export\t", "exportX", "DB_PASS", "a.b/c", "-x",
     "é", " ", "\t", "=", "==", "'", '"', "\\", "\\n", "\\$", "#", " #", "\x00", "\udcff",
     _VALUE_TOKEN, "x" * 40],
    max_size=30,
)  # fmt: skip


# Raw bytes, or (three times as often) lines built from the pieces .env syntax is made of.
_ENV_LINES = _ENV_FRAGMENTS.map(lambda pieces: "".join(pieces).encode("utf-8", "surrogatepass"))
_ENVFILES = st.one_of(st.binary(max_size=200), _ENV_LINES, _ENV_LINES, _ENV_LINES)


@TEN_THOUSAND
@given(_ENVFILES)
def test_envfile_parser_is_total_and_never_shows_a_value(data: bytes) -> None:
    try:
        entries = parse_envfile(data)
    except InputError as exc:
        # A value never shows; the token may only appear where it stood as a key.
        keys = [line.partition("=")[0] for line in data.decode("utf-8", "replace").split("\n")]
        if not any(_VALUE_TOKEN in key for key in keys):
            assert _VALUE_TOKEN not in str(exc)
        return
    assert entries
    assert len({entry.name for entry in entries}) == len(entries)
    for entry in entries:
        assert validate_name(entry.name) == entry.name
        assert 0 < len(entry.value) <= 32767
        assert repr(entry) == f"Entry(name={entry.name!r}, line={entry.line})"


# -- TOML config loader ---------------------------------------------------------------------

_TOML_LINES = _pieces(
    [
        'region = "us-east-1"',
        'endpoint_url = "http://127.0.0.1:1"',
        'endpoint_url = "ftp://x"',
        "ttl = 300",
        "ttl = 0",
        "ttl = -1",
        "ttl = 1e400",
        "ttl = true",
        "negative_ttl = 3601",
        "deadline = 0.5",
        "deadline = nan",
        "deadline = inf",
        "deadline = 60.0001",
        'blob_dir = "relative"',
        'blob_dir = "/etc/kmskeys/secrets"',
        'prefix = "Kms"',
        'prefix = "kms"',
        "allow_legacy_blobs = 1",
        'syslog_facility = "local0"',
        'backend = "stored"',
        "colour = 'blue'",
        "names = 3",
        '[names."app/*"]',
        "allow_users = []",
        'allow_users = ["www-data", 33, true, ""]',
        "ttl = 60",
        "[names]",
        "[[names]]",
        'shared_credentials_file = "/root/creds"',
        "path = '/etc/passwd'",
        "region = 1979-05-27T07:32:00Z",
        "= =",
        "[",
        "\x00",
    ],
    max_size=8,
)


# Raw bytes, or (four times as often) lines of TOML our loader has opinions about.
_TOML_TEXT = _TOML_LINES.map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))
_TOML_TEXTS = st.one_of(st.binary(max_size=200), _TOML_TEXT, _TOML_TEXT, _TOML_TEXT, _TOML_TEXT)


@TEN_THOUSAND
@given(_TOML_TEXTS)
def test_config_loader_is_total(raw: bytes) -> None:
    try:
        config = parse_text(raw, Path("/kmst/resolver.toml"))
    except ConfigError as exc:
        assert "/kmst/resolver.toml" in str(exc)
        return
    assert isinstance(config, Config)
    assert config.ttl >= 1 and 1 <= config.negative_ttl <= 3600
    assert 0.5 <= config.deadline <= 60
    assert config.blob_dir.is_absolute()


_SCALAR_VALUES = [None, True, False, 0, 1, -1, 59, 3600, 3601, 2**63, 0.4, 0.5, 60.0, float("nan"),
                  "", "kms", "Kms", "/abs/path", "rel/path", "http://h", "ftp://h", "authpriv",
                  "local0", "root", "33"]  # fmt: skip
_SCALARS: st.SearchStrategy[Any] = st.sampled_from(_SCALAR_VALUES)
_LISTS = _pieces(_SCALAR_VALUES)
_VALUES: st.SearchStrategy[Any] = (
    _SCALARS
    | _pieces(_SCALAR_VALUES, max_size=3)
    | st.dictionaries(st.sampled_from(["*", "app/*", "ttl"]), _SCALARS | _LISTS)
    | st.dictionaries(
        st.sampled_from(["*", "app/*"]),
        st.dictionaries(st.sampled_from(["ttl", "allow_users", "x"]), _SCALARS | _LISTS),
    )
)
_KEYS = st.sampled_from(
    [
        "backend",
        "region",
        "endpoint_url",
        "profile",
        "shared_credentials_file",
        "ttl",
        "negative_ttl",
        "deadline",
        "blob_dir",
        "prefix",
        "allow_legacy_blobs",
        "syslog_socket",
        "syslog_facility",
        "names",
        "path",
    ]
)


# The structured values behind the TOML text: fewer examples, each far richer.
@settings(max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_config_validation_is_total(data: dict[str, Any]) -> None:
    try:
        config = parse(data)
    except ConfigError:
        return
    assert isinstance(config, Config)
    for rule in config.names:
        assert rule.ttl is None or rule.ttl >= 1
        assert rule.allow_users is None or all(isinstance(u, str) and u for u in rule.allow_users)
