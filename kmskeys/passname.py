"""`pass:` key descriptions: which part of which password-store entry a request names.

One grammar for the client (builds descriptions) and the resolver (parses them), stdlib only:

    PREFIX:NAME[#SELECTOR]

    NAME     = the entry, as `pass show NAME` names it (kmskeys.names: no `..`, no empty or `.`
               segment, letters, digits and _ . / @ + -); the file is STORE/NAME.gpg
    SELECTOR = (none)         the first line without its line end: the password, by convention
             | "all"          the whole decrypted entry, byte for byte
             | "field=" KEY   the value of the first `KEY: value` line after the first line
                              (the pass convention for extra lines: `login: alice`), without
                              the blanks after the colon and without its line end

KEY is 1..64 of `A-Za-z0-9_.-` and matches exactly (case included). `#` cannot occur in a NAME,
and `=` cannot occur in a KEY, so no selector is ever mistaken for part of a name or a key. There
is one text per request: the first line has no `#first` spelling, so that `pass:NAME` and an
alias of it are never two cache entries of one secret.
"""

# No `from __future__ import annotations`: a reference read by get_secret loads this module.
SELECTOR_SEP = "#"
SELECT_ALL = "all"
FIELD_PREFIX = "field="
MAX_FIELD_KEY = 64
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


class PassQuery:
    """What a `pass:` description asks for: the first line, the whole entry or one field."""

    __slots__ = ("field", "kind")

    FIRST, ALL, FIELD = "first", "all", "field"

    def __init__(self, kind: str = "first", field: str | None = None) -> None:
        if kind not in (self.FIRST, self.ALL, self.FIELD):
            raise _invalid(f"unknown pass: selector kind {kind!r}")
        if (kind == self.FIELD) != (field is not None):
            raise _invalid("a pass: field selector needs a key, and only it has one")
        if field is not None:
            check_field_key(field)
        self.kind = kind
        self.field = field

    def selector(self) -> str:
        """The canonical selector text: `""`, `#all` or `#field=KEY`."""
        if self.kind == self.FIRST:
            return ""
        if self.kind == self.ALL:
            return SELECTOR_SEP + SELECT_ALL
        return f"{SELECTOR_SEP}{FIELD_PREFIX}{self.field}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PassQuery) and (self.kind, self.field) == (
            other.kind,
            other.field,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.field))

    def __repr__(self) -> str:
        return f"PassQuery({self.kind!r}, field={self.field!r})"


def _invalid(message: str) -> Exception:
    from kmskeys.errors import InvalidNameError

    return InvalidNameError(message)


def check_field_key(key: str) -> str:
    """Return `key` if it may name a `key: value` field, else raise InvalidNameError."""
    if (
        not isinstance(key, str)
        or not 0 < len(key) <= MAX_FIELD_KEY
        or not _KEY_CHARS.issuperset(key)
    ):
        raise _invalid(f"a pass: field key is 1 to {MAX_FIELD_KEY} of A-Z a-z 0-9 _ . -")
    return key


def split_selector(rest: str) -> tuple[str, str]:
    """`("email/work", "#field=login")` from the part of a description after `PREFIX:`."""
    name, sep, selector = rest.partition(SELECTOR_SEP)
    return name, sep + selector


def parse_selector(selector: str) -> PassQuery:
    """The query a selector (`""`, `#all`, `#field=KEY`) stands for; anything else raises."""
    if not selector:
        return PassQuery()
    body = selector[1:] if selector.startswith(SELECTOR_SEP) else None
    if body == SELECT_ALL:
        return PassQuery(PassQuery.ALL)
    if body is not None and body.startswith(FIELD_PREFIX):
        return PassQuery(PassQuery.FIELD, body[len(FIELD_PREFIX) :])
    # Never repeat more than a bounded, printable prefix of hostile input.
    shown = ascii(selector[:40])
    raise _invalid(f"pass: selector {shown} must be empty, #all or #field=KEY")


def parse_pass_description(rest: str) -> tuple[str, PassQuery]:
    """(NAME, query) from what follows `PREFIX:`; the name is validated."""
    from kmskeys.names import validate_name

    name, selector = split_selector(rest)
    return validate_name(name), parse_selector(selector)


def pass_description(prefix: str, name: str, query: PassQuery | None = None) -> str:
    """The key description `PREFIX:NAME[#SELECTOR]` (prefix and name validated)."""
    from kmskeys.names import description

    return description(name, prefix) + (query or PassQuery()).selector()


def check_reference(text: str) -> str:
    """Return `text` if it is `NAME` or `NAME#SELECTOR` (a `pass:` entry's part), else raise
    InvalidNameError: what `kmskeys exec` mappings and `get_secret` names may be."""
    from kmskeys.names import validate_name

    name, selector = split_selector(text)
    validate_name(name)
    parse_selector(selector)
    return text


def reference_description(prefix: str, text: str) -> str:
    """The description of `NAME#SELECTOR` under `prefix`, in its one canonical spelling."""
    name, selector = split_selector(text)
    return pass_description(prefix, name, parse_selector(selector))


def select(entry: bytes, query: PassQuery) -> bytes:
    """The part of a decrypted entry that `query` names; LookupError (with no entry text) if the
    entry has no such part.

    Lines end at LF; a CR before it is part of the line end (an entry written on Windows).
    """
    if query.kind == PassQuery.ALL:
        return entry
    lines = entry.split(b"\n")
    if query.kind == PassQuery.FIRST:
        return lines[0].removesuffix(b"\r")
    wanted = (query.field or "").encode("ascii")
    for line in lines[1:]:
        key, colon, value = line.removesuffix(b"\r").partition(b":")
        if colon and key.strip(b" \t") == wanted:
            return value.lstrip(b" \t")
    raise LookupError(f"the entry has no {query.field!r} field")


__all__ = [
    "FIELD_PREFIX",
    "SELECT_ALL",
    "PassQuery",
    "check_field_key",
    "check_reference",
    "parse_pass_description",
    "parse_selector",
    "pass_description",
    "reference_description",
    "select",
    "split_selector",
]
