"""What an application names: `NAME`, `NAME#SELECTOR`, or a whole description `PREFIX:NAME#...`.

`get_secret` reads a secret reference here only when it holds a `:` or a `#`
(kmskeys/names.py `is_reference`): a valid NAME never loads this module, nor a reference of
a common shape (`sm:prod/db#password`, `ssm:app/db#3`), which the hit-path extension reads in
C to the same description (kmskeys/_names.h; tests/unit/test_common_reference.py).
`kmskeys get`, `kmskeys exec` (`--env DB=sm:prod/db#password`) and `kmskeys flush` read every
name here.
`:` and `#` are outside the name alphabet, so each reading is unambiguous:

- `PREFIX:REST` is a whole description: its prefix is the one asked for. Given with a prefix
  argument other than the default (`kms`) that differs, it is refused: two prefixes for one
  request is a mistake, not a choice to make silently.
- `NAME#SELECTOR` takes the selector grammar of its prefix: none for `kms:` and `token:`;
  kmskeys/awsname.py for `sm:` and `ssm:`, whose descriptions must be canonical (one spelling
  per request, so one secret is never two kernel keys); kmskeys/passname.py for `pass:`;
  kmskeys/stored.py for `stored:`.
- A prefix the client does not know (an operator's own name for a backend) takes a selector
  that one of the backends' grammars accepts: the resolver, which knows which backend serves
  it, checks it exactly. The client's check is for early, clear errors; the resolver's is the
  one that counts.
"""

# No `from __future__ import annotations`, and the prefixes from the package rather than
# kmskeys/contract.py: `get_secret("prod/db#password", prefix="sm")` in a fresh process reads
# this module (and the selector grammar) and no other.
from kmskeys import (
    DEFAULT_PASS_PREFIX,
    DEFAULT_PREFIX,
    DEFAULT_SM_PREFIX,
    DEFAULT_SSM_PREFIX,
    DEFAULT_STORED_PREFIX,
    DEFAULT_TOKEN_PREFIX,
)

SELECTOR_SEP = "#"
MAX_SELECTOR = 512
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@+=-")


def _invalid(message: str) -> Exception:
    from kmskeys.errors import InvalidNameError

    return InvalidNameError(message)


def _shown(text: str) -> str:
    return ascii(text[:40] + ("…" if len(text) > 40 else ""))


def split_reference(ref: str | bytes, prefix: str = DEFAULT_PREFIX) -> tuple[str, str, str]:
    """(PREFIX, NAME, SELECTOR) of a reference, each checked; SELECTOR canonical or `""`."""
    from kmskeys.names import validate_name, validate_prefix

    if isinstance(ref, bytes):
        try:
            ref = ref.decode("ascii")
        except UnicodeDecodeError:
            raise _invalid("secret name must be ASCII") from None
    if not isinstance(ref, str):
        raise _invalid(f"secret name must be str or bytes, not {type(ref).__name__}")
    head, colon, rest = ref.partition(":")
    if colon:
        if prefix not in (DEFAULT_PREFIX, head):
            raise _invalid(
                f"{_shown(ref)} names the prefix {_shown(head)}, but the prefix asked for is "
                f"{_shown(prefix)}: give one of them"
            )
        prefix, ref = validate_prefix(head), rest
    else:
        validate_prefix(prefix)
    name, sep, selector = ref.partition(SELECTOR_SEP)
    return prefix, validate_name(name), check_selector(prefix, sep + selector)


def check_selector(prefix: str, selector: str) -> str:
    """`selector` if the grammar of `prefix` accepts it, else InvalidNameError."""
    if not selector:
        return selector
    if prefix in (DEFAULT_PREFIX, DEFAULT_TOKEN_PREFIX):
        raise _invalid(f"{prefix}: names take no selector ('#'): {_shown(selector)}")
    grammar = _GRAMMARS.get(prefix)
    if grammar is not None:
        grammar(selector)
        return selector
    # A prefix of the operator's own naming: one of the backends' grammars must accept it.
    for check in _GRAMMARS.values():
        try:
            check(selector)
        except ValueError:
            continue
        return selector
    raise _invalid(
        f"selector {_shown(selector)} fits no backend's grammar: pass: #all or #field=KEY; sm: "
        "[#FIELD][#stage=LABEL|#version=ID]; ssm: #VERSION or #LABEL; stored: [#SCOPE][#vN]"
    )


def _pass(selector: str) -> None:
    from kmskeys.passname import parse_selector

    parse_selector(selector)  # one spelling each: #all, #field=KEY


def _sm(selector: str) -> None:
    from kmskeys.awsname import parse_sm_selector

    parse_sm_selector(selector)


def _ssm(selector: str) -> None:
    from kmskeys.awsname import parse_ssm_selector

    parse_ssm_selector(selector)


def _stored(selector: str) -> None:
    from kmskeys.stored import parse_qualifier

    parse_qualifier(selector)  # the stored: backend's own reading (docs/dpapi.md)


_GRAMMARS = {
    DEFAULT_PASS_PREFIX: _pass,
    DEFAULT_SM_PREFIX: _sm,
    DEFAULT_SSM_PREFIX: _ssm,
    DEFAULT_STORED_PREFIX: _stored,
}


def described(ref: str | bytes, prefix: str = DEFAULT_PREFIX) -> str:
    """The kernel key description of a reference: `PREFIX:NAME[#SELECTOR]`."""
    from kmskeys.names import description, is_reference

    if not is_reference(ref):
        return description(ref, prefix)
    found_prefix, name, selector = split_reference(ref, prefix)
    return f"{found_prefix}:{name}{selector}"
