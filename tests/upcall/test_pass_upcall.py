"""`pass:` through the real upcall: tests/support/pass_handler.py runs resolver.passstore as the
resolver will, for the uid the kernel gives it (%u), with the real gpg and gpg-agent.

Requesters: root (its store configured in the handler's config, as root's config would) and the
test user, as each kind of requester this session exercises (tests/support/requester.py).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmskeys import keyutils
from tests.support.pass_rule import PassRule, pass_rule
from tests.support.passgpg import PassOwner, missing, pass_owner, pass_user, scratch
from tests.support.requester import Requester

pytestmark = pytest.mark.upcall


@pytest.fixture(scope="module")
def owners() -> Iterator[tuple[PassOwner, PassOwner]]:
    """Root's store (below a scratch directory) and a test user's; fails if gpg/pass lack."""
    lacking = missing()
    if lacking:
        pytest.fail("the pass upcall tests cannot run here; missing: " + "; ".join(lacking))
    import pwd

    with (
        scratch() as base,
        pass_owner(base / "root", pwd.getpwuid(0)) as root,
        pass_user(base) as user,
    ):
        yield root, user


@pytest.fixture
def rule(tmp_path: Path, owners: tuple[PassOwner, PassOwner]) -> Iterator[PassRule]:
    """The pass rule; root's location is a per-uid override, the user's the default."""
    root, user = owners
    root.start_agent_if_stopped()
    user.start_agent_if_stopped()
    root.unlock()
    user.unlock()
    with pass_rule(tmp_path) as installed:
        installed.configure({0: {"store": str(root.store), "gnupg": str(root.gnupg)}})
        yield installed


def _request(description: str) -> object:
    """In a requester: request the key (upcalling) into the session keyring and read it."""
    serial = keyutils.request_key(
        b"user", description.encode(), b"", keyutils.KEY_SPEC_SESSION_KEYRING
    )
    return keyutils.keyctl_read(serial).decode()


def _as(requester: Requester | None, user: PassOwner, description: str) -> object:
    if requester is None:
        return requester_root(description)
    return requester.run(user.pw.pw_name, lambda: _request(description))


def requester_root(description: str) -> object:
    """Root requests in a child (its own session keyring), reporting like as_user."""
    from tests.support.requester import as_user

    return as_user(0, lambda: _request(description))


def _checked_verdict(rule: PassRule, before: int) -> dict[str, object]:
    verdict = rule.last_verdict(before)
    # The handler's record never holds the secret (only its size).
    assert "hunter2" not in str(verdict) and "alice" not in str(verdict)
    return verdict


def test_root_reads_its_store_through_the_upcall(rule: PassRule, session_keyring: object) -> None:
    before = len(rule.verdicts())
    assert requester_root(rule.description("email/work")) == {"ok": "hunter2"}
    assert _checked_verdict(rule, before) == {"ok": True, "size": 7}
    got = requester_root(rule.description("email/work#field=owner"))
    assert got == {"ok": "root"}


def test_a_user_reads_its_own_store_as_itself(
    rule: PassRule, owners: tuple[PassOwner, PassOwner], requester: Requester
) -> None:
    _, user = owners
    before = len(rule.verdicts())
    assert _as(requester, user, rule.description("email/work")) == {"ok": "hunter2"}
    assert _checked_verdict(rule, before)["ok"] is True
    # Root's store has the same name: the kernel's %u picked the user's, read as the user.
    got = _as(requester, user, rule.description("email/work#field=owner"))
    assert got == {"ok": user.pw.pw_name}


def test_a_locked_agent_answers_eagain_and_unlocking_is_enough(
    rule: PassRule, owners: tuple[PassOwner, PassOwner], requester: Requester
) -> None:
    _, user = owners
    user.lock()
    before = len(rule.verdicts())
    got = _as(requester, user, rule.description("email/work"))
    assert got == {"error": "TemporarilyUnavailableError", "errno": errno.EAGAIN}
    verdict = _checked_verdict(rule, before)
    assert verdict["error"] == "AgentLockedError" and "unlock" in str(verdict["reason"])
    # EAGAIN is never cached by the kernel: once unlocked, the next request resolves.
    user.unlock()
    assert _as(requester, user, rule.description("email/work")) == {"ok": "hunter2"}


def test_refusals_reach_the_requester_as_their_class(
    rule: PassRule, owners: tuple[PassOwner, PassOwner], requester: Requester
) -> None:
    _, user = owners
    cases = {
        "email/real": ("KeyRejectedError", errno.EKEYREJECTED, "PassRefusedError"),
        "big#all": ("KeyRejectedError", errno.EKEYREJECTED, "PassRefusedError"),
        "foreign": ("KeyRejectedError", errno.EKEYREJECTED, "PassRefusedError"),
        "email/nothere": ("KeyNotFoundError", errno.ENOKEY, "PassEntryMissing"),
    }
    for rest, (client_error, code, resolver_error) in cases.items():
        before = len(rule.verdicts())
        got = _as(requester, user, rule.description(rest))
        assert got == {"error": client_error, "errno": code}, rest
        assert _checked_verdict(rule, before)["error"] == resolver_error, rest
