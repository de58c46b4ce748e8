"""A secret bound to a program (issue 24) asked for again with an explicit keyring, through the
real upcall, the real resolver and real cgroup v2 groups. Such a key grants LINK to nobody, and
request_key(2) checks LINK when it finds a key and has a destination: `get_secret(keyring=...)`
and `Key.request(destination=...)` find it in that keyring instead of linking it, and refuse,
saying why, when it is only in another one (docs/security.md, section 12).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable

import pytest

from kmskeys import Key, Keyring, keyutils
from tests.support import cgroups
from tests.support.requester import NOBODY, Requester
from tests.upcall.harness import Install
from tests.upcall.programs.bound import SECRET, asking, in_unit, named_secret

pytestmark = pytest.mark.upcall

STEMS = pytest.mark.parametrize("stem", ["pbapp", "pbcg"], ids=["allow_units", "allow_cgroups"])
NOT_LINKED = "never linked into another"


def _get_later(install: Install, name: str, **options: object) -> Callable[[], object]:
    """get_secret once the hit path's memory of the serial is past (1 s): request_key again."""

    def get() -> object:
        time.sleep(1.1)
        return asking(install, name, **options)()

    return get


def _refused(step: Callable[[], object]) -> Callable[[], object]:
    """`step`, with a PermissionError's class, errno and message (the child's own report of an
    error has no message)."""

    def run() -> object:
        try:
            return {"got": step()}
        except PermissionError as exc:
            return {"error": type(exc).__name__, "errno": exc.errno, "message": str(exc)}

    return run


def _assert_not_linked(got: object) -> None:
    assert isinstance(got, dict) and "ok" in got, got
    assert got["ok"]["error"] == "KeyPermissionError" and got["ok"]["errno"] == errno.EACCES, got
    assert NOT_LINKED in got["ok"]["message"], got


@pytest.mark.parametrize("keyring", ["session", None])
@STEMS
def test_the_allowed_program_gets_its_key_again_with_an_explicit_session_keyring(
    install: Install, cg: cgroups.Slice, requester: Requester, keyring: str | None, stem: str
) -> None:
    """The client finds the key in the session keyring instead of linking it."""
    name = named_secret(install, stem)
    steps = [asking(install, name, keyring=keyring), _get_later(install, name, keyring=keyring)]
    with in_unit(cg, "app.service", NOBODY, requester.mode, steps) as app:
        assert app.run(0) == {"ok": SECRET.decode()}
        assert app.run(1) == {"ok": SECRET.decode()}
    assert install.decrypts() == 1


@pytest.mark.parametrize("when", ["at once", "later"])
def test_a_program_bound_key_is_never_linked_into_a_shared_keyring(
    install: Install, cg: cgroups.Slice, requester: Requester, when: str
) -> None:
    """Cached in the session keyring, then asked for with keyring="user": the key is not there,
    and linking it there would hand it to every program of the uid. The error says so, also
    within the second the hit path remembers the key found for keyring="session"."""
    name = named_secret(install)
    user = (asking if when == "at once" else _get_later)(install, name, keyring="user")
    steps = [asking(install, name, keyring="session"), _refused(user)]
    with in_unit(cg, "app.service", NOBODY, requester.mode, steps) as app:
        assert app.run(0) == {"ok": SECRET.decode()}
        _assert_not_linked(app.run(1))
    assert install.decrypts() == 1


def _request(install: Install, name: str, destination: str) -> Callable[[], object]:
    """Key.request(..., destination=...).read() in the requester: bytes and an int take the C
    fast path, a str and a Keyring the Python side (kmskeys/_request.py)."""

    def request() -> object:
        desc = install.description(name)
        if destination == "int":
            key = Key.request(desc.encode(), b"", keyutils.KEY_SPEC_SESSION_KEYRING)
        elif destination == "Keyring":
            key = Key.request(desc, "", destination=Keyring.session())
        else:
            key = Key.request(desc, "", destination=Keyring.user())
        return {"serial": key.serial, "payload": key.read().decode()}

    return request


@pytest.mark.parametrize("destination", ["int", "Keyring"])
@STEMS
def test_key_request_finds_a_program_bound_key_again_in_its_destination(
    install: Install, cg: cgroups.Slice, requester: Requester, destination: str, stem: str
) -> None:
    """Key.request with the destination of the first request: the same key, no second Decrypt;
    with another destination (the user keyring) it is refused and the error says why."""
    name = named_secret(install, stem)
    request = _request(install, name, destination)
    steps = [request, request, _refused(_request(install, name, "user"))]
    with in_unit(cg, "app.service", NOBODY, requester.mode, steps) as app:
        first = app.run(0)
        assert isinstance(first, dict) and first.get("ok", {}).get("payload") == SECRET.decode()
        assert app.run(1) == first
        _assert_not_linked(app.run(2))
    assert install.decrypts() == 1
