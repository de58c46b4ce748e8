"""The kernel facts a program-bound key rests on (issue 24): possessor bits alone.

A key with possessor VIEW, READ and SEARCH and nothing for its owner, group or others
(kmskeys.contract.PROGRAM_KEY_PERM) is read by the client's hit path (kmskeys._hitpath:
request_key, then keyctl_describe for the owner check, then keyctl_read) in a process that
possesses it through its session keyring, and by its children, which share that keyring;
another process of the same uid neither finds it nor describes, reads or links it. The client
still refuses such a key owned by another uid, though possessing it lets it describe the key.
Nobody may link it: Key.request with a destination finds it there instead.
"""

from __future__ import annotations

import errno
import os

import pytest

from kmskeys import (
    Key,
    KeyOwnershipError,
    KeyPermissionError,
    Keyring,
    _hitpath,
    get_secret,
    keyutils,
)
from kmskeys.contract import PROGRAM_KEY_PERM
from tests.support.names import unique
from tests.support.requester import NOBODY, Requester, Steps, as_user

pytestmark = pytest.mark.kernel

POSSESSOR_ONLY = PROGRAM_KEY_PERM
SECRET = b"kmst-possessed"


def _attempts(description: bytes, serial: int) -> dict[str, object]:
    """What each way of reaching the key gives this process: a value or an errno."""
    out: dict[str, object] = {}
    ways = {
        "request_key": lambda: keyutils.request_key(b"user", description, None, 0),
        "describe": lambda: keyutils.keyctl_describe_alloc(serial),
        "read": lambda: keyutils.keyctl_read(serial),
        "fetch": lambda: _hitpath.fetch(description, None, 0),
        "link": lambda: keyutils.keyctl_link(serial, keyutils.KEY_SPEC_USER_KEYRING),
    }
    for name, way in ways.items():
        try:
            way()
            out[name] = "ok"
        except OSError as exc:
            out[name] = exc.errno
    return out


def test_a_possessor_only_key_answers_its_session_alone(requester: Requester) -> None:
    description = f"kmst:{unique('possessed')}".encode()

    planted_here: list[int] = []  # in the child's memory, from plant() on

    def plant() -> int:
        serial = keyutils.add_key(b"user", description, SECRET, keyutils.KEY_SPEC_SESSION_KEYRING)
        keyutils.keyctl_setperm(serial, POSSESSOR_ONLY)
        planted_here.append(serial)
        return serial

    def own_fetch() -> object:
        serial, payload = _hitpath.fetch(description, None, 0)[:2]
        return {"serial": serial, "payload": payload.decode() if payload else None}

    def child_fetch() -> int:
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if _hitpath.fetch(description, None, 0)[1] == SECRET else 2)
            except BaseException:
                os._exit(3)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def own_link() -> object:
        # No possessor LINK: not even the owner can put it in a keyring others search.
        return _attempts(description, planted_here[0])["link"]

    steps = [plant, own_fetch, child_fetch, own_link]
    with Steps(NOBODY, steps, mode=requester.mode) as owner:
        assert owner.ready() == {"ok": None}
        planted = owner.run(0)
        assert isinstance(planted, dict) and "ok" in planted, planted
        serial = planted["ok"]
        # The owner's hit path: found through its session keyring, so possessed, so the
        # describe of the owner check passes on possessor VIEW alone, and the read on READ.
        assert owner.run(1) == {"ok": {"serial": serial, "payload": SECRET.decode()}}
        assert owner.run(2) == {"ok": 0}  # a child shares the session keyring
        assert owner.run(3) == {"ok": errno.EACCES}
        # Another process of the same uid, in a session of its own or in the test's.
        for session in ("new", "inherit"):
            seen = as_user(
                NOBODY,
                lambda: _attempts(description, serial),
                session=session,
                mode=requester.mode,
            )
            assert seen == {
                "ok": {
                    "request_key": errno.ENOKEY,
                    "describe": errno.EACCES,
                    "read": errno.EACCES,
                    "fetch": errno.ENOKEY,
                    "link": errno.EACCES,
                }
            }, session


def test_the_client_refuses_a_possessed_key_of_another_owner(
    requester: Requester, session_keyring: object
) -> None:
    """Root's program-bound key in a session keyring a user process shares (runuser without a
    new session): the user possesses it, so describe works, and the client's owner check is
    what refuses it (KeyOwnershipError), never a read."""
    name = unique("possessed")
    description = f"kmst:{name}".encode()
    serial = keyutils.add_key(b"user", description, SECRET, keyutils.KEY_SPEC_SESSION_KEYRING)
    keyutils.keyctl_setperm(serial, POSSESSOR_ONLY)

    def take() -> object:
        owner = keyutils.keyctl_describe_alloc(serial).decode().split(";")[1]
        try:
            get_secret(name, prefix="kmst")
        except OSError as exc:
            return {"owner": owner, "refused": type(exc).__name__}
        return {"owner": owner, "refused": None}

    seen = as_user(NOBODY, take, session="inherit", mode=requester.mode)
    assert seen == {"ok": {"owner": "0", "refused": "KeyOwnershipError"}}


def test_key_request_finds_a_possessor_only_key_in_its_destination(
    session_keyring: Keyring,
) -> None:
    """request_key(2) with a destination checks LINK on the key it finds, which a program-bound
    key grants nobody: Key.request finds the key already in its destination instead (the C
    fast path and the Python side alike), still checks its owner, and says why when the key is
    only elsewhere (docs/security.md, section 12)."""
    description = f"kmst:{unique('possessed')}".encode()
    serial = keyutils.add_key(b"user", description, SECRET, keyutils.KEY_SPEC_SESSION_KEYRING)
    keyutils.keyctl_setperm(serial, POSSESSOR_ONLY)
    with pytest.raises(OSError) as refused:
        keyutils.request_key(b"user", description, None, keyutils.KEY_SPEC_SESSION_KEYRING)
    assert refused.value.errno == errno.EACCES  # the kernel fact this rests on

    assert Key.request(description, None, keyutils.KEY_SPEC_SESSION_KEYRING).serial == serial
    assert Key.request(description.decode(), destination=session_keyring).read() == SECRET

    elsewhere = Keyring(session_keyring.add_key("keyring", f"kmst:{unique('ring')}", b"").serial)
    with pytest.raises(KeyPermissionError, match="never linked into another") as caught:
        Key.request(description, None, elsewhere)
    assert caught.value.errno == errno.EACCES
    assert elsewhere.list() == []

    planted = f"kmst:{unique('planted')}".encode()
    foreign = keyutils.add_key(b"user", planted, SECRET, keyutils.KEY_SPEC_SESSION_KEYRING)
    keyutils.keyctl_chown(foreign, NOBODY, -1)  # as if nobody had planted it here
    keyutils.keyctl_setperm(foreign, POSSESSOR_ONLY)
    with pytest.raises(KeyOwnershipError) as planted_by:
        Key.request(planted, None, keyutils.KEY_SPEC_SESSION_KEYRING)
    assert planted_by.value.owner == NOBODY and planted_by.value.serial == foreign
