"""Which session keyring this process uses, who owns it and who shares the cached keys."""

from __future__ import annotations

from collections.abc import Iterator

from kmskeys.doctor.finding import FAIL, INFO, Finding
from kmskeys.errors import KeyctlError


def check_session_keyring(uid: int) -> Iterator[Finding]:
    """Which session keyring this process uses, who owns it and who shares the cached keys."""
    from kmskeys.key import Keyring

    try:
        desc = Keyring.session(create=False).describe()
    except KeyctlError:
        yield Finding(
            INFO,
            "session",
            "no session keyring yet: the first request creates one (the user session keyring); "
            "under systemd services get a private one (KeyringMode=private)",
        )
        return
    if desc.uid != uid:
        yield Finding(
            FAIL,
            "session",
            f"the session keyring {desc.description!r} is owned by uid {desc.uid}, not by uid "
            f"{uid}: its owner can read or plant what this process caches there (a joined "
            "or inherited session: su, runuser, keyctl session NAME)",
            # keyctl new_session cannot help: the kernel replaces a parent's session keyring
            # only when the caller's euid owns it (KEYCTL_SESSION_TO_PARENT).
            "exec keyctl session -  # a shell in a keyring of its own; a service: "
            "KeyringMode=private",
        )
    elif desc.description.startswith("_uid_ses."):
        yield Finding(
            INFO,
            "session",
            "session keyring is this user's default one: every process of the user shares the "
            "cache; under systemd, services get a private one (KeyringMode=private)",
        )
    elif desc.description == "_ses":
        yield Finding(
            INFO,
            "session",
            "session keyring is a private one (_ses): only this process tree shares the cache, "
            "e.g. a service under systemd KeyringMode=private and its CGI children",
        )
    else:
        yield Finding(
            INFO,
            "session",
            f"session keyring {desc.description!r}: processes that joined it share the cache",
        )
