"""kmskeys.passname: the pass:NAME[#selector] grammar and the selection of an entry's part."""

from __future__ import annotations

import pytest

from kmskeys.errors import InvalidNameError
from kmskeys.passname import PassQuery, parse_pass_description, pass_description, select

pytestmark = pytest.mark.unit

ENTRY = b"hunter2\r\nlogin: alice\nurl:  https://x/y:z\nlogin: second\n"


@pytest.mark.parametrize(
    ("query", "text"),
    [
        (PassQuery(), "pass:email/work"),
        (PassQuery(PassQuery.ALL), "pass:email/work#all"),
        (PassQuery(PassQuery.FIELD, "login"), "pass:email/work#field=login"),
    ],
)
def test_descriptions_round_trip(query: PassQuery, text: str) -> None:
    assert pass_description("pass", "email/work", query) == text
    assert parse_pass_description(text.partition(":")[2]) == ("email/work", query)


@pytest.mark.parametrize(
    "rest",
    [
        "email/work#first",  # the first line has one spelling only: no selector
        "email/work#",
        "email/work#all#all",
        "email/work#field=",
        "email/work#field=a b",
        "email/work#field=a#b",
        "email/work#field=" + "k" * 65,
        "../etc/passwd",
        "email//work",
        "",
    ],
)
def test_malformed_descriptions_are_refused(rest: str) -> None:
    with pytest.raises(InvalidNameError):
        parse_pass_description(rest)


def test_a_refusal_never_repeats_more_than_a_bounded_prefix() -> None:
    with pytest.raises(InvalidNameError) as caught:
        parse_pass_description("x#" + "secret" * 100)
    assert len(str(caught.value)) < 200


def test_select_first_line_all_and_fields() -> None:
    assert select(ENTRY, PassQuery()) == b"hunter2"
    assert select(ENTRY, PassQuery(PassQuery.ALL)) == ENTRY
    assert select(ENTRY, PassQuery(PassQuery.FIELD, "login")) == b"alice"  # the first wins
    assert select(ENTRY, PassQuery(PassQuery.FIELD, "url")) == b"https://x/y:z"
    # The first line is the password, never a field, even if it looks like one.
    with pytest.raises(LookupError):
        select(b"login: pw\nuser: u\n", PassQuery(PassQuery.FIELD, "login"))
    with pytest.raises(LookupError) as caught:
        select(b"login: pw\n", PassQuery(PassQuery.FIELD, "login"))
    assert "pw" not in str(caught.value)


def test_fields_match_exactly() -> None:
    with pytest.raises(LookupError):
        select(ENTRY, PassQuery(PassQuery.FIELD, "Login"))


def test_query_construction_is_checked() -> None:
    with pytest.raises(InvalidNameError):
        PassQuery(PassQuery.FIELD)
    with pytest.raises(InvalidNameError):
        PassQuery(PassQuery.ALL, "login")
    with pytest.raises(InvalidNameError):
        PassQuery("second-line")


def test_a_reference_is_a_name_or_a_name_and_one_selector() -> None:
    from kmskeys.passname import check_reference, reference_description

    assert check_reference("email/work") == "email/work"
    assert check_reference("email/work#field=login") == "email/work#field=login"
    assert reference_description("pass", "email/work#all") == "pass:email/work#all"
    assert reference_description("pass", "email/work") == "pass:email/work"
    for bad in ("email/work#", "email/work#first", "email/work#field=", "../x#all", "a#all#all"):
        with pytest.raises(InvalidNameError):
            check_reference(bad)


def test_get_secret_builds_the_selector_description_and_refuses_a_bad_one() -> None:
    from kmskeys import _describe

    assert _describe("email/work#field=login", "pass") == b"pass:email/work#field=login"
    assert _describe("email/work", "kms") == b"kms:email/work"
    with pytest.raises(InvalidNameError):
        _describe("email/work#field=a b", "pass")


def test_eagain_on_a_pass_entry_says_to_unlock_the_agent() -> None:
    import errno

    from kmskeys.errors import TemporarilyUnavailableError, error_for_errno

    for desc in ("pass:email/work", "mypass:email/work#field=login"):
        exc = error_for_errno(errno.EAGAIN, "request_key " + desc, upcall=True, description=desc)
        assert isinstance(exc, TemporarilyUnavailableError)
        assert "gpg-agent is locked" in str(exc) and "`pass show email/work`" in str(exc)
        assert "KMS" not in str(exc)
    # Any other prefix keeps the class's own advice.
    other = error_for_errno(errno.EAGAIN, "request_key kms:x", upcall=True, description="kms:x")
    assert "KMS could not be reached" in str(other) and "gpg-agent" not in str(other)
