"""`pass:` for the programs of a user's graphical session (docs/tokens.md, "Only applications
launched from my window manager"), through the real upcall, the real resolver, two test users'
real stores, keys and agents, and real cgroup v2 groups in the shape systemd-logind gives a
login: `user-UID.slice/session-N.scope`, beside the delegated `user@UID.service`.

The policy is the docs' `[pass."GLOB"]` with `allow_cgroups` naming session scopes. What the docs
promise, checked here: a program of the session gets its entry, decrypted by its **own** uid's
gpg-agent (the store and agent of the kernel's %u, never of the session the process sits in);
a program of the same user outside a session scope is refused before gpg runs, also when it
names a cgroup of its own `session-N.scope` below its delegated manager; and another uid, in its
own session or moved into this user's, never gets this user's entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from tests.stored.harness import StoredInstall, stored_installed
from tests.support import cgroups
from tests.support.names import unique_prefix
from tests.support.passgpg import PassOwner, missing, pass_user, scratch
from tests.support.requester import Requester, Steps

pytestmark = [pytest.mark.upcall, pytest.mark.tokens]

ENTRY = "email/work#field=owner"  # the entry's `owner:` line names whose store answered


@dataclass
class Session:
    """Two pass users and their cgroups, and the resolver whose policy admits session scopes."""

    alice: PassOwner
    bob: PassOwner
    cg: cgroups.Slice
    install: StoredInstall

    def session(self, owner: PassOwner, number: int) -> str:
        return f"/{self.cg.name}/user-{owner.uid}.slice/session-{number}.scope"

    def manager(self, owner: PassOwner) -> str:
        return f"/{self.cg.name}/user-{owner.uid}.slice/user@{owner.uid}.service"

    @property
    def prefix(self) -> str:
        return str(self.install.settings["pass_prefix"])


@pytest.fixture(scope="module")
def made() -> Iterator[Session]:
    """alice and bob (a key, an agent and a store each), their login slices with a session scope
    and a delegated manager each, and the install."""
    lacking = missing() + cgroups.missing()
    if lacking:
        pytest.fail("the pass: session tests cannot run here; missing: " + "; ".join(lacking))
    with ExitStack() as stack:
        alice = stack.enter_context(pass_user(stack.enter_context(scratch())))
        bob = stack.enter_context(pass_user(stack.enter_context(scratch())))
        cg = stack.enter_context(cgroups.slice_with())
        top = f"/{cg.name}"
        for owner, number in ((alice, 2), (bob, 3)):
            login = cg.sub(top, f"user-{owner.uid}.slice")
            cg.sub(login, f"session-{number}.scope")
            # systemd delegates the user manager's subtree to the user (Delegate=yes).
            manager = cg.sub(login, f"user@{owner.uid}.service", owner=owner.uid)
            cg.sub(manager, "app.slice")
        # A group the user may name as it likes inside its delegated subtree.
        cg.sub(f"{top}/user-{alice.uid}.slice/user@{alice.uid}.service", "session-9.scope")
        policy = f'[pass."email/*"]\nallow_cgroups = ["{top}/user-*.slice/session-*.scope"]\n'
        install = stack.enter_context(
            stored_installed(rules="pass", pass_prefix=unique_prefix(), names=policy)
        )
        yield Session(alice, bob, cg, install)


@pytest.fixture
def world(made: Session) -> Iterator[Session]:
    """Both agents running and unlocked, the log drained."""
    for owner in (made.alice, made.bob):
        owner.start_agent_if_stopped()
        owner.unlock()
    made.install.log.drain()
    yield made


def _read(prefix: str) -> Callable[[], dict[str, Any]]:
    def read() -> dict[str, Any]:
        from kmskeys import get_secret

        try:
            return {"value": get_secret(ENTRY, prefix=prefix).decode()}
        except Exception as exc:
            return {"error": type(exc).__name__, "errno": getattr(exc, "errno", None)}

    return read


def _ask(world: Session, owner: PassOwner, cgroup: str, mode: str) -> object:
    """`owner`'s process, moved into `cgroup` (as root does: logind, systemd), asks for ENTRY."""
    with Steps(owner.pw.pw_name, [_read(world.prefix)], mode=mode) as child:
        assert child.ready() == {"ok": None}
        world.cg.move(child.pid, cgroup)
        return child.run(0)


def test_a_program_of_the_users_session_gets_it_from_the_users_own_agent(
    world: Session, requester: Requester
) -> None:
    alice = world.alice
    got = _ask(world, alice, world.session(alice, 2), requester.mode)
    assert got == {"ok": {"value": alice.pw.pw_name}}, got
    line = world.install.log.wait_for("email/work")
    assert " outcome=ok " in line and " source=pass " in line, line
    assert f" user={alice.pw.pw_name} " in line and " unit=session-2.scope " in line, line


@pytest.mark.parametrize("where", ["manager", "named session"])
def test_the_same_user_outside_a_session_scope_is_refused_before_gpg(
    world: Session, requester: Requester, where: str
) -> None:
    alice = world.alice
    manager = world.manager(alice)
    # A service of the user's own systemd instance; a group the user named session-9.scope in
    # the subtree delegated to it (the resolver trusts the path down to the delegation only).
    cgroup = f"{manager}/app.slice" if where == "manager" else f"{manager}/session-9.scope"
    got = _ask(world, alice, cgroup, requester.mode)
    assert got == {"ok": {"error": "KeyRejectedError", "errno": 129}}, got
    line = world.install.log.wait_for("email/work")
    assert " outcome=refused " in line and "program policy (cgroup)" in line, line
    assert "gpg:" not in line, line  # refused before the store was opened


def test_another_uid_gets_its_own_entry_from_its_own_agent_never_the_users(
    world: Session, requester: Requester
) -> None:
    alice, bob = world.alice, world.bob
    # In its own session: bob's store, bob's agent.
    got = _ask(world, bob, world.session(bob, 3), requester.mode)
    assert got == {"ok": {"value": bob.pw.pw_name}}, got
    assert f" user={bob.pw.pw_name} " in world.install.log.wait_for("email/work")
    # Moved into alice's session, whose agent is unlocked: still bob's own store and agent,
    # which is locked now, so nothing at all (EAGAIN), and never alice's entry.
    bob.lock()
    got = _ask(world, bob, world.session(alice, 2), requester.mode)
    assert got == {"ok": {"error": "TemporarilyUnavailableError", "errno": 11}}, got
    line = world.install.log.wait_for("email/work")
    assert " outcome=locked " in line and f" user={bob.pw.pw_name} " in line, line
    assert f"{bob.pw.pw_name}'s gpg-agent is locked" in line, line
    assert alice.pw.pw_name not in line.replace(f"user-{alice.uid}.slice", ""), line
