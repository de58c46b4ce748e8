"""The shared name validator: the description contract of docs/design.md."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmskeys import _hitpath
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


def python_reading(name: object, prefix: object) -> bytes | None:
    """The description kmskeys/names.py gives a plain name, or None where it refuses."""
    try:
        return description(name, prefix).encode()  # type: ignore[arg-type]
    except InvalidNameError:
        return None


# The hit path reads a name in C (kmskeys/_names.h through kmskeys/_hitpath.c `describe`):
# it must accept every name and prefix this module accepts, as the same description, and
# nothing else (None leaves the name to this module, which says what is wrong).
PREFIXES = ["kms", "kmst1", "a", "a-b_9", "z" * 32, "", "KMS", "1kms", "k s", "k\x00", "x" * 33]


@pytest.mark.parametrize("prefix", PREFIXES)
# (`colon:x` is a reference: tests/unit/test_common_reference.py.)
@pytest.mark.parametrize("name", [name for name in GOOD + BAD if ":" not in name])
def test_the_c_reading_of_a_name_is_the_python_one(name: str, prefix: str) -> None:
    assert _hitpath.describe(name, prefix) == python_reading(name, prefix)
    assert _hitpath.describe(name.encode(), prefix) == python_reading(name.encode(), prefix)


class Name(str):
    """A str subclass, whose methods could say anything: the C reading leaves it to Python."""


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        (Name("db"), "kms"),
        ("db", Name("kms")),
        (b"db", b"kms"),
        (7, "kms"),
        ("db", None),
        ("\ud800", "kms"),
        ("db", "k\udfff"),
        (bytearray(b"db"), "kms"),
        (b"\xffdb", "kms"),
    ],
)
def test_the_c_reading_leaves_anything_else_to_python(name: object, prefix: object) -> None:
    assert _hitpath.describe(name, prefix) is None


_NAME_PIECES = st.sampled_from(
    ["a", "Z", "0", "9", "/", ".", "..", "_", "-", "@", "+", "\x00", " ", "é", "%", "\n"]
)


@pytest.mark.fuzz
@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(st.lists(_NAME_PIECES, max_size=20).map("".join), st.text(max_size=220)),
    st.sampled_from(PREFIXES),
)
def test_the_c_and_python_readings_agree_on_any_name(name: str, prefix: str) -> None:
    if ":" in name or "#" in name:
        return  # a reference: tests/unit/test_common_reference.py
    assert _hitpath.describe(name, prefix) == python_reading(name, prefix)
    raw = name.encode()
    assert _hitpath.describe(raw, prefix) == python_reading(raw, prefix)
