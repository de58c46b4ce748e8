"""Where the resolver caches: keyring="user" and "persistent" share one decrypt across every
session of a uid (cron jobs, shells), through the real upcall."""

from __future__ import annotations

import pytest

from kmskeys import KmsKeysError, get_secret
from kmskeys.contract import ADMIN_KEY_PERM
from tests.support.names import unique
from tests.support.requester import NOBODY, as_user
from tests.upcall.harness import Install

pytestmark = pytest.mark.upcall


@pytest.mark.parametrize("kind", ["user", "persistent"])
def test_one_decrypt_serves_every_session_of_the_uid(resolver: Install, kind: str) -> None:
    name = unique(kind)
    text = resolver.blob(b"kmst-" + kind.encode(), name)

    def first_session() -> object:
        secret = get_secret(name, text, prefix=resolver.prefix, keyring=kind).decode()
        from kmskeys import Key

        key = Key.request(resolver.description(name))
        desc = key.describe()
        return {"secret": secret, "owner": desc.uid, "perm": desc.perm}

    def later_session() -> object:
        # A new anonymous session keyring, as a cron job or a fresh shell has: the shared
        # keyring is not linked from it, so only keyring=KIND finds the key, as a hit.
        try:
            get_secret(name, None, prefix=resolver.prefix, keyring="session")
            alone = "found"
        except KmsKeysError as exc:
            alone = type(exc).__name__
        shared = get_secret(name, prefix=resolver.prefix, keyring=kind).decode()
        return {"alone": alone, "shared": shared}

    def forget() -> None:
        from kmskeys import Key

        Key.request(resolver.description(name)).invalidate()

    try:
        first = as_user(NOBODY, first_session)
        assert first == {"ok": {"secret": f"kmst-{kind}", "owner": NOBODY, "perm": ADMIN_KEY_PERM}}
        later = as_user(NOBODY, later_session)
        assert later == {"ok": {"alone": "KeyNotFoundError", "shared": f"kmst-{kind}"}}
        assert resolver.decrypts() == 1
    finally:
        as_user(NOBODY, forget, session="new")
