"""The env-file reader behind `kmskeys bundle`: .env conventions, line-numbered errors."""

from __future__ import annotations

import pytest

from encryptor.bundle import parse_envfile
from encryptor.errors import InputError

pytestmark = pytest.mark.unit


def values(text: str) -> dict[str, bytes]:
    return {e.name: e.value for e in parse_envfile(text.encode())}


def test_conventions() -> None:
    text = (
        "\ufeff# a comment\n"
        "\n"
        "PLAIN=value\n"
        "export EXPORTED=yes\n"
        "  SPACED  =  padded value  \n"
        "INLINE=abc # comment\n"
        "HASH=abc#notacomment\n"
        "SINGLE='lit $HOME \\n # kept'\n"
        'DOUBLE="a\\nb\\t\\"q\\" \\\\ \\$x \\z" # comment\n'
        "EQUALS=a=b=c\n"
        "CRLF=windows\r\n"
        "app/db.password=nested\n"
    )
    assert values(text) == {
        "PLAIN": b"value",
        "EXPORTED": b"yes",
        "SPACED": b"padded value",
        "INLINE": b"abc",
        "HASH": b"abc#notacomment",
        "SINGLE": b"lit $HOME \\n # kept",
        "DOUBLE": b'a\nb\t"q" \\ $x \\z',
        "EQUALS": b"a=b=c",
        "CRLF": b"windows",
        "app/db.password": b"nested",
    }


def test_line_numbers() -> None:
    entries = parse_envfile(b"# c\nA=1\n\nB=2\n")
    assert [(e.name, e.line) for e in entries] == [("A", 2), ("B", 4)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A=1\nkmst-no-equals-secret\n", "line 2: expected KEY=VALUE"),
        ("A=1\n=value\n", "line 2: expected KEY=VALUE"),
        ("A=1\n\n../up=kmst-v\n", "line 3: .*secret name"),
        ("A=1\nA=2\n", "line 2: A is already defined on line 1"),
        ("A=\n", "line 1: A has an empty value"),
        ("A=''\n", "line 1: A has an empty value"),
        ("A='kmst-unterminated\n", "line 1: unterminated single quote"),
        ('A="kmst-unterminated\n', "line 1: unterminated double quote"),
        ("A='x' kmst-trailing\n", "line 1: unexpected text"),
        ("# only comments\n\n", "no KEY=VALUE"),
        ("A=" + "x" * 32768 + "\n", "line 1: A is over 32767 bytes"),
        ("exportA=1\nB C=2\n", "line 2"),
    ],
)
def test_bad_lines_name_the_line_and_never_the_value(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        parse_envfile(text.encode())
    assert "kmst-" not in str(caught.value)
    assert "x" * 100 not in str(caught.value)


def test_invalid_utf8_names_the_line() -> None:
    with pytest.raises(InputError, match="line 3: not valid UTF-8"):
        parse_envfile(b"A=1\nB=2\nC=\xff\n")


def test_entry_repr_hides_the_value() -> None:
    (entry,) = parse_envfile(b"TOKEN=kmst-hidden-value\n")
    assert "kmst-hidden-value" not in repr(entry)
