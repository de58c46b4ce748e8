"""The shared name validator: the description contract of docs/design.md."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmskeys.errors import InvalidNameError, KmsKeysError
from kmskeys.names import (
    MAX_NAME_BYTES,
    description,
    parse_description,
    validate_name,
    validate_prefix,
)

pytestmark = pytest.mark.unit

GOOD = ["db-password", "a", "0", "app/prod/db.password", "svc@host", "a+b", "x_y", "A" * 200]
BAD = [
    "",
    "/abs",
    "-flag",
    ".hidden",
    "_x",
    "a..b",
    "../up",
    "a/../b",
    "a//b",
    "a/",
    "a/./b",
    "a/.",
    "sp ace",
    "tab\t",
    "new\nline",
    "nul\x00",
    "pct%d",
    "semi;colon",
    "colon:x",
    "ünïcode",
    "A" * 201,
]


@pytest.mark.parametrize("name", GOOD)
def test_good_names(name: str) -> None:
    assert validate_name(name) == name
    assert validate_name(name.encode()) == name
    assert description(name) == f"kms:{name}"
    assert parse_description(f"kms:{name}") == name


@pytest.mark.parametrize("name", BAD)
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_name(name)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, KmsKeysError)


def test_error_message_shows_a_bounded_name() -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_name("../" + "x" * 5000)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("desc", ["kms", "other:name", "kms:", "kms:../x", ":name", b"kms:\xff"])
def test_bad_descriptions(desc: str | bytes) -> None:
    with pytest.raises(InvalidNameError):
        parse_description(desc)


@pytest.mark.parametrize("prefix", ["", "KMS", "1kms", "k:s", "k s", "x" * 33])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_prefix(prefix)


def test_prefix_namespaces_descriptions() -> None:
    assert description("n", "kmst1") == "kmst1:n"
    assert parse_description("kmst1:n", "kmst1") == "n"
    with pytest.raises(InvalidNameError):
        parse_description("kms:n", "kmst1")


@pytest.mark.fuzz
@settings(max_examples=2000)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_validator_is_total_and_safe(raw: str | bytes) -> None:
    try:
        name = validate_name(raw)
    except InvalidNameError:
        return
    # Whatever passes is safe as a path below blob_dir and as a description.
    assert 0 < len(name.encode()) <= MAX_NAME_BYTES
    assert not name.startswith("/")
    assert all(seg not in ("", ".", "..") for seg in name.split("/"))
    assert name.isascii()
    assert not any(c in name for c in ":%;\x00\n ")
