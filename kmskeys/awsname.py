"""`sm:` and `ssm:` key descriptions: which AWS secret or parameter, which version, which field.

One grammar for the client (kmskeys/secretref.py reads what an application names) and the
resolver (resolver/spec_sm.py and resolver/spec_ssm.py split descriptions with it), stdlib only:

    SM_PREFIX:NAME[#FIELD][#stage=LABEL | #version=ID]

    NAME   the secret's name below `sm_path_prefix` (kmskeys/names.py: no `..`, no empty or
           `.` segment, letters, digits and _ . / @ + -)
    FIELD  one top-level key of a JSON secret (the value of `password` in
           {"password": "...", "port": 5432}): 1..128 of A-Z a-z 0-9 _ . @ + -, matched exactly;
           a `.` is a character of the key, never a path into nested objects
    LABEL  a staging label other than AWSCURRENT, which is the default and has no spelling:
           AWSPREVIOUS, AWSPENDING or one of yours; 1..256 of A-Z a-z 0-9 _ . @ + -
    ID     a VersionId: 32..64 of A-Z a-z 0-9 -

    SSM_PREFIX:NAME[#VERSION | #LABEL]

    NAME     the parameter's name below `ssm_path_prefix`, without the leading `/`: a NAME
             with a `/` is the hierarchical parameter `/NAME`, one without is the simple name
    VERSION  a version number, decimal, no leading zero (AWS's own `NAME:3`)
    LABEL    a version label (AWS's own `NAME:label`): 1..100 of A-Z a-z 0-9 _ . -, not
             starting with a digit, nor with `aws` or `ssm` in any case (AWS's rules)

`#` cannot occur in a NAME and `=` cannot occur in a FIELD, so a selector is never mistaken for
part of a name, and `#stage=...` never for a field. Each request has exactly one spelling (the
field first, no spelling of the default): a description that is not canonical is refused,
saying which spelling to use, so one secret is never two kernel keys.

get_secret's hit path reads the common shapes (`#FIELD`, `#VERSION`, `#LABEL`) without this
module, in C (kmskeys/_names.h): a change here is one there, and
tests/unit/test_common_reference.py fails until both agree.
"""

# No `from __future__ import annotations`: a reference read by get_secret loads this module.
SELECTOR_SEP = "#"
DEFAULT_STAGE = "AWSCURRENT"
STAGE_KEY = "stage="
VERSION_KEY = "version="
MAX_FIELD = 128
MAX_STAGE = 256
MIN_VERSION_ID, MAX_VERSION_ID = 32, 64
MAX_LABEL = 100
MAX_PARAMETER_VERSION = 2**63 - 1

_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_TOKEN_CHARS = _ALNUM | frozenset("_.@+-")
_VERSION_ID_CHARS = _ALNUM | frozenset("-")
_LABEL_CHARS = _ALNUM | frozenset("_.-")


def _invalid(message: str) -> Exception:
    from kmskeys.errors import InvalidNameError

    return InvalidNameError(message)


def _shown(text: str) -> str:
    # Never repeat more than a bounded, printable prefix of hostile input.
    return ascii(text[:40] + ("…" if len(text) > 40 else ""))


def _token(value: object, most: int, chars: frozenset[str], what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= most or not chars.issuperset(value):
        raise _invalid(f"{what} must be 1 to {most} of {_alphabet(chars)}")
    return value


def _alphabet(chars: frozenset[str]) -> str:
    return "A-Z a-z 0-9 " + " ".join(sorted(chars - _ALNUM))


class SmQuery:
    """What an `sm:` description asks for: one version (a stage, or a VersionId) and, for a
    JSON secret, one field of it."""

    __slots__ = ("field", "stage", "version_id")

    def __init__(
        self, field: str | None = None, stage: str | None = None, version_id: str | None = None
    ) -> None:
        if field is not None:
            _token(field, MAX_FIELD, _TOKEN_CHARS, "a Secrets Manager field")
        if stage is not None:
            _token(stage, MAX_STAGE, _TOKEN_CHARS, "a Secrets Manager staging label")
        if version_id is not None and not MIN_VERSION_ID <= len(version_id) <= MAX_VERSION_ID:
            raise _invalid(f"a VersionId is {MIN_VERSION_ID} to {MAX_VERSION_ID} characters")
        if version_id is not None:
            _token(version_id, MAX_VERSION_ID, _VERSION_ID_CHARS, "a VersionId")
        if stage is not None and version_id is not None:
            raise _invalid("an sm: description names a stage or a VersionId, not both")
        self.field = field
        # AWSCURRENT is the default: it has no spelling of its own.
        self.stage = None if stage == DEFAULT_STAGE else stage
        self.version_id = version_id

    @property
    def aws_stage(self) -> str | None:
        """The VersionStage to ask for: AWSCURRENT unless a label or a VersionId is named."""
        if self.version_id is not None:
            return None
        return self.stage or DEFAULT_STAGE

    def selector(self) -> str:
        """The canonical selector text: `""`, `#FIELD`, `#stage=L`, `#FIELD#version=ID`..."""
        parts = [] if self.field is None else [self.field]
        if self.stage is not None:
            parts.append(STAGE_KEY + self.stage)
        if self.version_id is not None:
            parts.append(VERSION_KEY + self.version_id)
        return "".join(SELECTOR_SEP + part for part in parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SmQuery) and self.selector() == other.selector()

    def __hash__(self) -> int:
        return hash(self.selector())

    def __repr__(self) -> str:
        return f"SmQuery({self.selector()!r})"


class SsmQuery:
    """What an `ssm:` description asks for: the current version, a version number or a label."""

    __slots__ = ("label", "version")

    def __init__(self, version: int | None = None, label: str | None = None) -> None:
        if version is not None and (
            isinstance(version, bool)
            or not isinstance(version, int)
            or not 0 < version <= MAX_PARAMETER_VERSION
        ):
            raise _invalid("a parameter version is a whole number from 1")
        if label is not None:
            check_parameter_label(label)
        if version is not None and label is not None:
            raise _invalid("an ssm: description names a version or a label, not both")
        self.version = version
        self.label = label

    def aws_suffix(self) -> str:
        """What follows the parameter's name in GetParameter's Name: `""`, `:3`, `:label`."""
        if self.version is not None:
            return f":{self.version}"
        return "" if self.label is None else f":{self.label}"

    def selector(self) -> str:
        """The canonical selector text: `""`, `#3` or `#label`."""
        suffix = self.aws_suffix()
        return SELECTOR_SEP + suffix[1:] if suffix else ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SsmQuery) and self.selector() == other.selector()

    def __hash__(self) -> int:
        return hash(self.selector())

    def __repr__(self) -> str:
        return f"SsmQuery({self.selector()!r})"


def check_parameter_label(label: str) -> str:
    """Return `label` if AWS accepts it as a parameter version label, else InvalidNameError."""
    _token(label, MAX_LABEL, _LABEL_CHARS, "a parameter label")
    if label[0].isdigit() or label[:3].lower() in ("aws", "ssm"):
        raise _invalid(
            f"parameter label {_shown(label)} must not start with a digit, aws or ssm (AWS's rule)"
        )
    return label


def split_selector(rest: str) -> tuple[str, str]:
    """`("prod/db", "#password")` from the part of a description after `PREFIX:`."""
    name, sep, selector = rest.partition(SELECTOR_SEP)
    return name, sep + selector


def parse_sm_selector(selector: str) -> SmQuery:
    """The query a canonical `sm:` selector stands for; anything else raises InvalidNameError."""
    if not selector:
        return SmQuery()
    if not selector.startswith(SELECTOR_SEP):
        raise _invalid("an sm: selector starts with '#'")
    parts = selector[1:].split(SELECTOR_SEP)
    field = None if "=" in parts[0] else parts.pop(0)
    stage = version_id = None
    if parts:
        key, eq, value = parts.pop(0).partition("=")
        if not eq or key + eq not in (STAGE_KEY, VERSION_KEY):
            raise _invalid(
                f"sm: selector {_shown(selector)} must be [#FIELD][#stage=LABEL|#version=ID]"
            )
        stage, version_id = (value, None) if key + eq == STAGE_KEY else (None, value)
    if parts:
        first = field is None and "=" not in parts[0]
        why = "the field comes first" if first else "one field and one version at most"
        raise _invalid(f"sm: selector {_shown(selector)}: {why} (#FIELD#stage=LABEL)")
    query = SmQuery(field, stage, version_id)
    if query.selector() != selector:
        canonical = query.selector() or "no selector"
        raise _invalid(
            f"sm: selector {_shown(selector)} is spelled {_shown(canonical)} (AWSCURRENT is the "
            "default and has no spelling; a field comes first)"
        )
    return query


def parse_ssm_selector(selector: str) -> SsmQuery:
    """The query a canonical `ssm:` selector stands for; anything else raises InvalidNameError."""
    if not selector:
        return SsmQuery()
    body = selector[1:] if selector.startswith(SELECTOR_SEP) else ""
    if body.isascii() and body.isdigit():
        if body[0] == "0" or len(body) > 19 or int(body) > MAX_PARAMETER_VERSION:
            raise _invalid(f"ssm: version {_shown(body)} must be a number from 1, no 0 first")
        return SsmQuery(version=int(body))
    if not body:
        raise _invalid(f"ssm: selector {_shown(selector)} must be #VERSION or #LABEL")
    return SsmQuery(label=check_parameter_label(body))


def parse_sm(rest: str) -> tuple[str, SmQuery]:
    """(NAME, query) from what follows `PREFIX:` in an `sm:` description; NAME validated."""
    from kmskeys.names import validate_name

    name, selector = split_selector(rest)
    return validate_name(name), parse_sm_selector(selector)


def parse_ssm(rest: str) -> tuple[str, SsmQuery]:
    """(NAME, query) from what follows `PREFIX:` in an `ssm:` description; NAME validated."""
    from kmskeys.names import validate_name

    name, selector = split_selector(rest)
    return validate_name(name), parse_ssm_selector(selector)


def sm_description(prefix: str, name: str, query: SmQuery | None = None) -> str:
    """The key description `PREFIX:NAME[#...]` (prefix and name validated)."""
    from kmskeys.names import description

    return description(name, prefix) + (query or SmQuery()).selector()


def ssm_description(prefix: str, name: str, query: SsmQuery | None = None) -> str:
    """The key description `PREFIX:NAME[#VERSION|#LABEL]` (prefix and name validated)."""
    from kmskeys.names import description

    return description(name, prefix) + (query or SsmQuery()).selector()


__all__ = [
    "DEFAULT_STAGE",
    "SmQuery",
    "SsmQuery",
    "check_parameter_label",
    "parse_sm",
    "parse_sm_selector",
    "parse_ssm",
    "parse_ssm_selector",
    "sm_description",
    "split_selector",
    "ssm_description",
]
