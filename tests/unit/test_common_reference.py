"""get_secret reads a reference of a common shape (`sm:prod/db#password`, `NAME#FIELD` of an
operator's own prefix, `ssm:app/db#3`) in C, without loading the grammars (kmskeys/_names.h,
through kmskeys/_hitpath.c `describe`): that reading must give exactly what kmskeys/secretref.py
gives for a reference it accepts, and leave every other to it (None), which refuses it or reads
it; get_secret's whole reading (`_describe`) must give what secretref.py gives, refusals too."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmskeys import _describe, _hitpath
from kmskeys.secretref import described

pytestmark = pytest.mark.unit

PREFIXES = ["kms", "sm", "ssm", "pass", "stored", "token", "vault", "kmst9a", "SM", "", "a" * 33]

# Accepted as spelled, and read without the grammars.
COMMON = [
    ("prod/db#password", "sm"),
    ("prod/db#password", "kmst9a"),
    ("sm:prod/db#password", "kms"),
    ("sm:prod/db#password", "sm"),
    ("sm:prod/db", "kms"),
    ("ssm:app/prod/db", "kms"),
    ("ssm:app/prod/db#3", "kms"),
    ("app/prod/db#123456789012345678", "ssm"),
    ("app/db#prod-label_1.x", "ssm"),
    ("pass:email/work", "kms"),
    ("stored:key", "kms"),
    ("vault:app/db#user.name@x+y-z_", "kms"),
    ("db#" + "f" * 128, "sm"),
    (b"sm:prod/db#password", "kms"),
]

# Accepted or refused by the grammars alone: the C reading leaves them to secretref.py.
UNCOMMON = [
    ("db#password", "kms"),
    ("db#x", "token"),
    ("email/work#all", "pass"),
    ("email/work#field=login", "pass"),
    ("key#machine#v2", "stored"),
    ("sm:prod/db#password#stage=AWSPREVIOUS", "kms"),
    ("prod/db#stage=AWSPREVIOUS", "sm"),
    ("prod/db#stage=AWSCURRENT", "sm"),
    ("prod/db#", "sm"),
    ("prod/db#" + "f" * 129, "sm"),
    ("prod/db#a b", "sm"),
    ("prod/db#a#b", "kmst9a"),
    ("app/db#0", "ssm"),
    ("app/db#03", "ssm"),
    ("app/db#1234567890123456789", "ssm"),
    ("app/db#99999999999999999999", "ssm"),
    ("app/db#aws1", "ssm"),
    ("app/db#SSMx", "ssm"),
    ("app/db#1abc", "ssm"),
    ("app/db#a@b", "ssm"),
    ("app/db#" + "l" * 101, "ssm"),
    ("app/db#\u00b2", "ssm"),
    ("sm:prod/db", "ssm"),
    (b"sm:\xffdb#password", "kms"),
]

# Refused by the name or prefix checks that both readings share.
REFUSED = [
    ("sm:../etc/passwd#password", "kms"),
    ("sm:prod/../etc", "kms"),
    ("SM:prod/db#password", "kms"),
    ("sm:prod//db#password", "kms"),
    (":prod/db", "kms"),
    ("sm:#password", "kms"),
    ("#password", "sm"),
    ("sm:a:b#password", "kms"),
    ("sm:" + "a" * 201, "kms"),
    ("prod/db#password", "SM"),
    ("prod/db#password", ""),
]


def outcome(read: object, ref: str | bytes, prefix: str) -> tuple[str, str]:
    """("ok", description) or (the exception's class, its message)."""
    try:
        return "ok", read(ref, prefix)  # type: ignore[operator]
    except Exception as exc:  # the comparison is of every failure
        return type(exc).__name__, str(exc)


def common_reference(ref: str | bytes, prefix: str) -> str | None:
    """The C reading: the description, or None (left to kmskeys/secretref.py)."""
    found = _hitpath.describe(ref, prefix)
    return None if found is None else found.decode()


def full(ref: str | bytes, prefix: str) -> str:
    return described(ref, prefix).encode().decode()


def hot(ref: str | bytes, prefix: str) -> str:
    return _describe(ref, prefix).decode()


@pytest.mark.parametrize(("ref", "prefix"), COMMON)
def test_a_common_shape_is_read_without_the_grammars(ref: str | bytes, prefix: str) -> None:
    expected = described(ref, prefix)
    assert common_reference(ref, prefix) == expected
    assert _describe(ref, prefix) == expected.encode()


@pytest.mark.parametrize(("ref", "prefix"), UNCOMMON)
def test_every_other_selector_is_left_to_the_grammars(ref: str | bytes, prefix: str) -> None:
    assert common_reference(ref, prefix) is None
    assert outcome(hot, ref, prefix) == outcome(full, ref, prefix)


@pytest.mark.parametrize(("ref", "prefix"), REFUSED)
def test_a_bad_name_or_prefix_is_refused_the_same_way(ref: str | bytes, prefix: str) -> None:
    refused = outcome(full, ref, prefix)
    assert refused[0] == "InvalidNameError"
    assert common_reference(ref, prefix) is None
    assert outcome(hot, ref, prefix) == refused


# Text made of the characters that matter to the grammars, so that most draws are near misses.
_CHARS = ["a", "Z", "0", "1", "9", "/", ".", "..", "-", "_", "@", "+", "=", ":", "#", " ", "\u00e9"]
_WORDS = ["sm", "ssm", "aws", "AWS", "all", "field=", "stage=", "version=", "machine", "v2"]
_PIECES = st.sampled_from(_CHARS + _WORDS)
_REFS = st.lists(_PIECES, max_size=12).map("".join)


@settings(max_examples=3000, deadline=None)
@given(_REFS, st.sampled_from(PREFIXES))
def test_both_readings_agree_on_any_text(ref: str, prefix: str) -> None:
    assert outcome(hot, ref, prefix) == outcome(full, ref, prefix)
    quick = outcome(common_reference, ref, prefix)
    assert quick == ("ok", None) or quick == outcome(full, ref, prefix)
