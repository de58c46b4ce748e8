"""`stored:` key descriptions: which key of the host's keystore a request names (docs/dpapi.md).

One grammar for the client (kmskeys.dpapi builds descriptions) and the resolver (parses them):

    PREFIX:NAME[#SCOPE][#SELECTOR]

    SCOPE    = "user" | "machine"   asserted by the requester; the resolver refuses a scope that
                                    its policy does not give NAME
    SELECTOR = "v" N                key version N (decimal, 1..2**31-1, no leading zero)
             | "latest"             the payload is the newest version's number, in ASCII
             | "scope"              the payload is the policy's scope for NAME (no SCOPE then)
             | "account"            the payload is the requester's standing with its uid's
                                    user-scope keys: "ok", "other" (they belong to another
                                    account of the uid) or "retired" (no SCOPE then)

Without a selector the payload is version 1 of the key: `stored:NAME` returns the same bytes for
ever, rotation or not, which is the essay's contract. Version 1 is made on a miss of NAME without
a selector or of `#latest`; a `#vN` selector (what unprotect asks for) never makes a key. `#`
cannot occur in a NAME (`[A-Za-z0-9_./@+-]`), so a qualifier is never mistaken for part of a
name.
"""

from __future__ import annotations

import functools

SCOPE_USER = "user"
SCOPE_MACHINE = "machine"
SCOPES = (SCOPE_USER, SCOPE_MACHINE)
QUALIFIER_SEP = "#"
SELECT_LATEST = "latest"
SELECT_SCOPE = "scope"
SELECT_ACCOUNT = "account"
MAX_VERSION = 2**31 - 1

# The callout of a `stored:` request is the key size in bytes; empty means the default.
KEY_SIZE_DEFAULT = 32
KEY_SIZE_MIN = 16
KEY_SIZE_MAX = 4096


class StoredQuery:
    """What a `stored:` description's qualifier asks for: a key version, `latest` or `scope`."""

    __slots__ = ("explicit", "kind", "scope", "version")

    KEY, LATEST, SCOPE, ACCOUNT = "key", "latest", "scope", "account"

    def __init__(
        self, kind: str, scope: str | None = None, version: int = 1, *, explicit: bool = False
    ) -> None:
        self.kind = kind
        self.scope = scope
        self.version = version
        # Parsed from a `#vN` selector: the key is looked up, never made on a miss. Not part
        # of equality: `#user#v1` and `#user` name the same key.
        self.explicit = explicit

    def qualifier(self) -> str:
        """The canonical qualifier text, `""` for plain version 1 with no scope."""
        parts = [self.scope] if self.scope is not None else []
        if self.kind == self.KEY:
            parts += [] if self.version == 1 and self.scope is None else [f"v{self.version}"]
        else:
            parts.append(self.kind)
        return "".join(QUALIFIER_SEP + part for part in parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoredQuery) and (self.kind, self.scope, self.version) == (
            other.kind,
            other.scope,
            other.version,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.scope, self.version))

    def __repr__(self) -> str:
        return f"StoredQuery({self.kind!r}, scope={self.scope!r}, version={self.version})"


def _invalid(message: str) -> Exception:
    from kmskeys.errors import InvalidNameError

    return InvalidNameError(message)


def split_qualifier(rest: str) -> tuple[str, str]:
    """`("NAME", "#user#v2")` from the part of a description after `PREFIX:`."""
    name, sep, qualifier = rest.partition(QUALIFIER_SEP)
    return name, sep + qualifier


def parse_qualifier(qualifier: str) -> StoredQuery:
    """The query a qualifier (`""`, `#machine`, `#user#v3`, `#latest`, `#scope`) stands for."""
    parts = qualifier.split(QUALIFIER_SEP)[1:] if qualifier else []
    if qualifier and not qualifier.startswith(QUALIFIER_SEP):
        raise _invalid("a stored: qualifier starts with '#'")
    scope = None
    if parts and parts[0] in SCOPES:
        scope = parts.pop(0)
    if not parts:
        return StoredQuery(StoredQuery.KEY, scope)
    if len(parts) > 1:
        raise _invalid(f"stored: qualifier {qualifier[:40]!r} has more than one selector")
    selector = parts[0]
    if selector == SELECT_LATEST:
        return StoredQuery(StoredQuery.LATEST, scope)
    if selector in (SELECT_SCOPE, SELECT_ACCOUNT) and scope is None:
        return StoredQuery(selector)
    digits = selector[1:]
    if (
        selector[:1] == "v"
        and digits.isascii()
        and digits.isdigit()
        and digits[0] != "0"
        and len(digits) <= 10
        and int(digits) <= MAX_VERSION
    ):
        return StoredQuery(StoredQuery.KEY, scope, int(digits), explicit=True)
    raise _invalid(
        f"stored: qualifier {qualifier[:40]!r} must be [#user|#machine][#vN|#latest], "
        "#scope or #account"
    )


def stored_description(prefix: str, name: str, query: StoredQuery) -> str:
    """The key description `PREFIX:NAME#...` for `query` (name and prefix validated)."""
    return _validated(prefix, name) + query.qualifier()


@functools.lru_cache(maxsize=256)
def _validated(prefix: str, name: str) -> str:
    # protect and unprotect build two descriptions per call: check each name once per process.
    from kmskeys.names import description

    return description(name, prefix)
