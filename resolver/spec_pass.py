"""The `pass:` backend's declaration: its settings, its grammar and its per-name policy.

Light on purpose: resolver/config.py composes this table on every miss, whatever the backend.
The backend itself is resolver/passbackend.py (with resolver/passstore.py and
resolver/gpgdecrypt.py), imported only for a `pass:` request (resolver/registry.py). Where each
user's store and GnuPG home are is root's word alone: templates of the passwd entry, never the
requester's environment nor a file of the user's (docs/tokens.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kmskeys import contract
from kmskeys.names import validate_name
from kmskeys.passname import split_selector
from resolver.backend import BackendSpec
from resolver.errors import ConfigError
from resolver.settings import policy, setting
from resolver.validators import MAX_TTL, NameRule, abs_path, prefix, seconds, text

TEMPLATE_FIELDS = ("home", "user", "uid")
# gpg-agent's own default-cache-ttl is 600 s: a cached entry lives half that, so it never
# outlasts the unlock that let it be read by much (docs/tokens.md, "A short ttl").
DEFAULT_PASS_TTL = 300
DEFAULT_DEADLINE_SHARE = 0.8
MIN_DEADLINE_SHARE = 0.1


def path_template(value: object, where: str) -> str:
    """An absolute path, or one that starts with `{home}`, using only {home}, {user}, {uid}."""
    import string  # only when a config sets a template: not on every miss's import path

    found = text(value, where)
    try:
        parts = list(string.Formatter().parse(found))
    except ValueError:
        raise ConfigError(f"{where}: {found!r} is not a valid template") from None
    for _, field_name, spec, conversion in parts:
        if field_name is None:
            continue
        if field_name not in TEMPLATE_FIELDS or spec or conversion:
            raise ConfigError(
                f"{where}: {found!r} may use only {{home}}, {{user}} and {{uid}} (no format "
                "specifications)"
            )
    if not (found.startswith("/") or found.startswith("{home}")):
        raise ConfigError(f"{where}: {found!r} must be absolute or start with {{home}}")
    return found


def deadline_share(value: object, where: str) -> float:
    """A fraction of the handler's remaining deadline, in [0.1, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number in [{MIN_DEADLINE_SHARE}, 1]")
    share = float(value)
    if not MIN_DEADLINE_SHARE <= share <= 1.0:
        raise ConfigError(f"{where} must be a number in [{MIN_DEADLINE_SHARE}, 1]")
    return share


@dataclass(frozen=True, init=False, repr=False, eq=False)
class PassSettings:
    """`pass:NAME[#all|#field=KEY]`: the requester's own password-store entry, read as that
    user through gpg (docs/tokens.md)."""

    pass_prefix: str = setting(
        contract.DEFAULT_PASS_PREFIX,
        prefix,
        "description namespace of password-store entries, `PASS_PREFIX:NAME[#all|"
        "#field=KEY]`; must differ from every other prefix (docs/tokens.md)",
    )
    pass_store_dir: str = setting(
        "{home}/.password-store",
        path_template,
        "where each user's store is: a template of `{home}`, `{user}`, `{uid}` from the passwd "
        "entry of the requesting uid (the kernel's `%u`); never the requester's "
        "`PASSWORD_STORE_DIR`. Every directory and entry below it must be the user's",
    )
    pass_gnupg_home: str = setting(
        "{home}/.gnupg",
        path_template,
        "each user's GnuPG home, a template as `pass_store_dir`; gpg finds the user's running "
        "agent from it (docs/tokens.md)",
    )
    pass_gpg: Path = setting(
        Path("/usr/bin/gpg"),
        abs_path,
        "the gpg program, run as the requesting user (its gpgconf is the one beside it)",
    )
    pass_ttl: int = setting(
        DEFAULT_PASS_TTL,
        seconds(1, MAX_TTL),
        'seconds a `pass:` key stays cached unless its `[pass."GLOB"]` rule says otherwise: '
        "short, below gpg-agent's own `default-cache-ttl` (600 s). `pass:` entries are never "
        "kept in the host cache",
        note="short: below gpg-agent's default-cache-ttl",
    )
    pass_deadline_share: float = setting(
        DEFAULT_DEADLINE_SHARE,
        deadline_share,
        "the share (0.1 to 1) of the handler's remaining `deadline` that gpg may take; the "
        "rest is kept to answer, so a hung agent is an `EAGAIN` that names gpg",
    )
    pass_rules: tuple[NameRule, ...] = policy(
        "per-name policy of `pass:` names (below)",
        "pass_prefix",
        ("ttl", "allow_users"),
        '[pass."email/*"]\nttl = 60',
        keys=("pass",),
    )


def split(rest: str) -> tuple[str, str]:
    """NAME and selector (`#all`, `#field=KEY`: checked by the backend, kmskeys.passname) from
    what follows `PREFIX:` in a `pass:` description."""
    name, selector = split_selector(rest)
    return validate_name(name), selector


SPEC = BackendSpec("pass", PassSettings, "pass_prefix", "pass_rules", split)
