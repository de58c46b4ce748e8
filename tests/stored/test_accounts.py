"""Issue 20 point 5 with real accounts: DPAPI user keys do not outlive the account.

`useradd` reuses a freed uid. User A protects, `userdel A`, `useradd B` with A's uid: B's
unprotect of A's blob used to succeed, since the keystore kept user keys by uid alone. Now the
keystore is bound to the account (uid, user name, a random account id): B is refused with a clear
error and nothing is written for B, until root retires A's keys; then B gets keys of its own and
A's blobs stay closed to B (kept in the keystore's `retired/`, restorable). With the userdel hook
enabled (USERDEL_CMD in /etc/login.defs, here in a private mount namespace so that no other
userdel on the host runs it), A's keys are retired as A is removed.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

import kmskeys
from tests.stored.harness import StoredInstall, stored_installed
from tests.support import user_keyrings
from tests.support.names import TEST_TAG
from tests.support.requester import as_user
from tests.upcall.harness import run_resolver

pytestmark = pytest.mark.upcall

TIMEOUT = 30


def _name() -> str:
    # useradd: lower case first, at most 32 characters.
    return f"{TEST_TAG}-acct-{secrets.token_hex(4)}"


def _tools() -> None:
    missing = [t for t in ("useradd", "userdel", "unshare", "mount") if not shutil.which(t)]
    if missing:
        pytest.fail(f"tier 'upcall' cannot run here; missing: {', '.join(missing)} (passwd)")


def _useradd(name: str, uid: int | None = None) -> pwd.struct_passwd:
    fixed = ["--uid", str(uid)] if uid is not None else []
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", *fixed, name],
        check=True, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    return pwd.getpwnam(name)


def _userdel(name: str) -> None:
    subprocess.run(["userdel", name], check=False, capture_output=True, timeout=TIMEOUT)


@contextmanager
def _accounts() -> Iterator[list[str]]:
    """A list the test adds its user names to; each is removed at the end, even on failure."""
    _tools()
    names: list[str] = []
    try:
        yield names
    finally:
        uids = set()
        for name in names:
            with suppress(KeyError):
                uids.add(pwd.getpwnam(name).pw_uid)
            _userdel(name)
        # Only now: a uid's keyrings outlive its account, which is what the tests look at.
        user_keyrings.forget(uids)


def _try(func: Callable[[], object]) -> Callable[[], object]:
    """func's result, or [error class, message]: the message is what the user reads."""

    def run() -> object:
        try:
            return {"ok": func()}
        except Exception as exc:
            return {"error": type(exc).__name__, "message": str(exc)}

    return run


def _protect(store: StoredInstall, name: str, data: bytes) -> Callable[[], object]:
    return _try(lambda: kmskeys.protect(data, name=name, prefix=store.stored_prefix))


def _unprotect(store: StoredInstall, blob: str) -> Callable[[], object]:
    return _try(lambda: kmskeys.unprotect(blob, prefix=store.stored_prefix).decode())


def _run(user: str, func: Callable[[], object]) -> dict[str, object]:
    outcome = as_user(user, func)
    assert isinstance(outcome, dict) and "ok" in outcome, outcome
    result = outcome["ok"]
    assert isinstance(result, dict)
    return result


def _admin(store: StoredInstall, *args: str) -> subprocess.CompletedProcess[str]:
    return run_resolver("stored", "--config", str(store.config), *args)


@pytest.fixture
def store(session_keyring: object) -> Iterator[StoredInstall]:
    """An install of its own: useradd hands the same freed uids to every test's users."""
    with stored_installed() as install:
        yield install


def test_a_reused_uid_does_not_open_the_old_accounts_blobs(store: StoredInstall) -> None:
    stored = store
    with _accounts() as created:
        key_name = f"{TEST_TAG}-{secrets.token_hex(3)}-acct"
        a_name, b_name = _name(), _name()
        a = _useradd(a_name)
        created.append(a_name)
        protected = _run(a_name, _protect(stored, key_name, b"A's secret"))
        blob = str(protected["ok"])
        assert _run(a_name, _unprotect(stored, blob)) == {"ok": "A's secret"}
        _userdel(a_name)
        b = _useradd(b_name, uid=a.pw_uid)  # the freed uid, as useradd may pick it by itself
        created.append(b_name)
        assert b.pw_uid == a.pw_uid
        stored.log.drain()
        # B is refused, clearly, and nothing is written for B.
        refused = _run(b_name, _unprotect(stored, blob))
        assert refused["error"] == "WrongUserError", refused
        message = str(refused["message"])
        assert f"uid {a.pw_uid}" in message and "another account" in message, message
        assert "stored retire" in message, message
        line = stored.log.wait_for(key_name)
        assert f"belong to {a_name!r}" in line and f"now has {b_name!r}" in line, line
        before = stored.files()
        assert _run(b_name, _protect(stored, key_name, b"B's"))["error"] == "WrongUserError"
        assert stored.files() == before
        # Root retires A's keys: B gets keys of its own, and A's blob stays closed to B.
        done = _admin(stored, "retire", "--uid", str(a.pw_uid))
        assert done.returncode == 0, done.stderr
        assert f"the keys of {a_name!r}" in done.stdout and "retired" in done.stdout
        still = _run(b_name, _unprotect(stored, blob))
        assert still["error"] == "UnknownKeyVersionError", still
        assert "retired" in str(still["message"]), still
        own = _run(b_name, _protect(stored, key_name, b"B's"))
        assert _run(b_name, _unprotect(stored, str(own["ok"]))) == {"ok": "B's"}
        assert _run(b_name, _unprotect(stored, blob))["error"] == "ProtectAuthenticationError"
        # A's keys are kept, out of the way, and listed.
        listed = _admin(stored, "accounts")
        assert listed.returncode == 0, listed.stderr
        rows = [
            line.split() for line in listed.stdout.splitlines() if line.startswith(f"{b.pw_uid} ")
        ]
        assert sorted(row[1] for row in rows) == sorted([a_name, b_name]), listed.stdout
        retired = next(row for row in rows if row[1] == a_name)
        assert retired[4] == "retired"
        kept = stored.keystore / "retired" / str(a.pw_uid) / retired[2] / key_name / "1"
        assert kept.is_file()
        # Root can give them back (a userdel by mistake) only once B's are out of the way.
        again = _admin(stored, "restore", "--uid", str(a.pw_uid), retired[2])
        assert again.returncode == 1 and "retire them first" in again.stderr


def _login_defs_with(hook: Path, where: Path) -> Path:
    text = Path("/etc/login.defs").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("USERDEL_CMD")]
    defs = where / "login.defs"
    defs.write_text("\n".join([*lines, f"USERDEL_CMD {hook}", ""]))
    return defs


def _userdel_with_hook(name: str, defs: Path) -> subprocess.CompletedProcess[str]:
    # A mount namespace of our own: only this userdel reads the login.defs with the hook.
    script = 'mount --bind "$1" /etc/login.defs && exec userdel "$2"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private",
         "sh", "-c", script, "-", str(defs), name],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip


def test_the_userdel_hook_retires_the_keys_as_the_account_goes(
    store: StoredInstall, tmp_path: Path
) -> None:
    stored = store
    os.chmod(tmp_path, 0o755)
    hook = tmp_path / "kmskeys-userdel"
    done = _admin(stored, "userdel-hook", "--write", str(hook))
    assert done.returncode == 0, done.stderr
    assert f"USERDEL_CMD {hook}" in done.stdout
    assert hook.stat().st_mode & 0o777 == 0o755 and hook.stat().st_uid == 0
    defs = _login_defs_with(hook, tmp_path)
    with _accounts() as created:
        key_name = f"{TEST_TAG}-{secrets.token_hex(3)}-hook"
        a_name, b_name = _name(), _name()
        a = _useradd(a_name)
        created.append(a_name)
        blob = str(_run(a_name, _protect(stored, key_name, b"A's secret"))["ok"])
        assert stored.entry(key_name, uid=a.pw_uid).is_file()
        removed = _userdel_with_hook(a_name, defs)
        assert removed.returncode == 0, removed.stderr
        assert "retired" in removed.stdout + removed.stderr, (removed.stdout, removed.stderr)
        with pytest.raises(KeyError):
            pwd.getpwnam(a_name)
        assert not (stored.keystore / "user" / str(a.pw_uid)).exists()
        retired = list((stored.keystore / "retired" / str(a.pw_uid)).iterdir())
        assert len(retired) == 1 and (retired[0] / key_name / "1").is_file()
        # The uid's next account starts with nothing of A's.
        _useradd(b_name, uid=a.pw_uid)
        created.append(b_name)
        opened = _run(b_name, _unprotect(stored, blob))
        assert opened["error"] == "UnknownKeyVersionError", opened
        own = _run(b_name, _protect(stored, key_name, b"B's"))
        assert _run(b_name, _unprotect(stored, str(own["ok"]))) == {"ok": "B's"}


def test_retire_flushes_every_key_cached_for_the_uid(store: StoredInstall) -> None:
    # A cached copy must not outlive the account either: the uid's next holder would own it.
    from kmskeys import Key, keyutils
    from tests.support.requester import Steps

    held: list[int] = []  # in the child

    def fetch() -> int:
        held.append(Key.request(store.description(key_name), "32").serial)
        return held[0]

    def still_there() -> str:
        try:
            keyutils.keyctl_read(held[0])
        except Exception as exc:
            return type(exc).__name__
        return "readable"

    with _accounts() as created:
        key_name = f"{TEST_TAG}-{secrets.token_hex(3)}-flush"
        a_name = _name()
        a = _useradd(a_name)
        created.append(a_name)
        with Steps(a_name, [fetch, still_there]) as child:
            assert child.ready() == {"ok": None}
            fetched = child.run(0)
            assert isinstance(fetched, dict) and "ok" in fetched, fetched
            assert child.run(1) == {"ok": "readable"}
            done = _admin(store, "retire", "--uid", str(a.pw_uid))
            assert done.returncode == 0, done.stderr
            assert "1 cached key(s) flushed" in done.stdout, done.stdout
            gone = child.run(1)
            assert gone in ({"ok": "KeyRevokedError"}, {"ok": "KeyNotFoundError"}), gone


def test_retired_keys_can_be_restored(store: StoredInstall) -> None:
    # A userdel by mistake: root retires (the hook did), then gives the keys back.
    with _accounts() as created:
        key_name = f"{TEST_TAG}-{secrets.token_hex(3)}-restore"
        a_name = _name()
        a = _useradd(a_name)
        created.append(a_name)
        blob = str(_run(a_name, _protect(store, key_name, b"kept"))["ok"])
        assert _admin(store, "retire", "--user", a_name).returncode == 0
        assert _run(a_name, _unprotect(store, blob))["error"] == "UnknownKeyVersionError"
        listed = _admin(store, "accounts").stdout.splitlines()
        ident = next(line.split()[2] for line in listed if line.startswith(f"{a.pw_uid} "))
        done = _admin(store, "restore", "--uid", str(a.pw_uid), ident)
        assert done.returncode == 0, done.stderr
        assert _run(a_name, _unprotect(store, blob)) == {"ok": "kept"}
        assert not (store.keystore / "retired" / str(a.pw_uid) / ident).exists()
        again = _admin(store, "restore", "--uid", str(a.pw_uid), ident)
        assert again.returncode == 1 and "retire them first" in again.stderr
