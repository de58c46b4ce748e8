"""A PKCS#11 token behind the real resolver and the real upcall: `token:` blobs and the keystore
sealed with `seal = "pkcs11"`, on a SoftHSM2 token initialised by the test.

The resolver is what `kmskeys-resolver install --rules token,stored` writes; request-key runs
it with no SOFTHSM2_CONF, so the token lives in SoftHSM's own configuration (a unique label,
deleted after: tests/support/softhsm.py `system_token`). Destructive cases (the token pulled
out, the module gone, a wrong PIN) get a token and an install of their own.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kmskeys import Key, Keyring, get_secret
from kmskeys.errors import KeyRejectedError, TemporarilyUnavailableError
from kmskeys.tokenblob import BLOB_SUFFIX, seal_blob
from tests.stored.harness import StoredInstall, stored_installed, write_root_file
from tests.support.names import unique, unique_prefix
from tests.support.requester import Requester
from tests.support.softhsm import Token, run_child, system_token
from tests.support.ttl import MIN_TTL

pytestmark = [pytest.mark.tokens, pytest.mark.upcall]

VALUE = b"kmst-token-upcall-value"
CKF_USER_PIN_COUNT_LOW, CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED = 0x10000, 0x20000, 0x40000
SHORT = "kmst-*-short-*"  # names with the shortest ttl the suite relies on (tests/support/ttl.py)

_CHILD = """
import base64
def main(p):
    import pkcs11
    token = pkcs11.lib(p["module"]).get_token(token_label=p["label"])
    if p["op"] == "flags":
        return int(token.flags)
    if p["op"] == "login":
        with token.open(user_pin=p["pin"]):
            return True
    from resolver.pkcs11seal import TokenSettings, public_key
    settings = TokenSettings(p["module"], p["label"], p["key"], pin_file="/unused")
    return base64.b64encode(public_key(settings)).decode()
"""


def token_op(token: Token, op: str, **payload: object) -> object:
    """In a fresh process (its own C_Initialize): the token's flags, a login, its public key."""
    base = {"module": token.module, "label": token.label, "key": token.key_label, "op": op}
    got = run_child(_CHILD, token.env(), {**base, **payload})
    assert "ok" in got, got
    return got["ok"]


class TokenInstall:
    """An installed resolver for a token, its blob_dir and PIN file."""

    def __init__(self, install: StoredInstall, token: Token, pin: Path, spki: bytes) -> None:
        self.install, self.token, self.pin, self.spki = install, token, pin, spki

    @property
    def prefix(self) -> str:
        return str(self.install.settings["token_prefix"])

    def deploy(self, name: str, value: bytes = VALUE, **options: Any) -> None:
        """blob_dir/NAME.kmsp, root's, as the build side's `encrypt --to` makes it."""
        blob = seal_blob(self.spki, value, name, **options).to_text()
        write_root_file(self.install.root / "blobs" / f"{name}{BLOB_SUFFIX}", blob + "\n", 0o644)

    def get(self, name: str) -> bytes:
        """request + read of token:NAME in a fresh session keyring: a miss every time (not
        get_secret, whose per-thread memory reads a key found a moment ago by its serial)."""
        Keyring.join_session()
        return Key.request(f"{self.prefix}:{name}", "").read()

    def lines(self) -> list[str]:
        """Every log line so far; none may hold a PIN."""
        lines = self.install.log.drain()
        for line in lines:
            assert self.token.user_pin not in line and self.token.so_pin not in line, line
        return lines


@contextmanager
def token_install(tmp: Path, *, module: str | None = None, **settings: Any) -> Iterator[Any]:
    """A token, and a resolver routing a unique token: prefix and stored: prefix to it."""
    with system_token() as token:
        pin = tmp / f"{unique('pin')}.pin"
        token.write_pin(pin)
        spki = base64.b64decode(str(token_op(token, "public")))
        values = {
            "token_prefix": unique_prefix(),
            "token_module": module or token.module,
            "token_label": token.label,
            "token_key_label": token.key_label,
            "token_pin_file": pin,
            "seal": "pkcs11",
            **settings,
        }
        names = f'[token."{SHORT}"]\nttl = {MIN_TTL}\n'
        with stored_installed(rules="token,stored", names=names, **values) as install:
            try:
                yield TokenInstall(install, token, pin, spki)
            finally:
                # The host cache's entries of this prefix, and every uid's keys: gone.
                from kmskeys.hostflush import flush_host

                flush_host(str(values["token_prefix"]), None)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenInstall]:
    """The module's token and install, for the cases that leave the token as it was."""
    with token_install(tmp_path_factory.mktemp("token")) as made:
        yield made


@pytest.fixture
def installed(shared: TokenInstall, session_keyring: object) -> TokenInstall:
    """The shared install with its log drained."""
    shared.install.log.drain()
    return shared


@pytest.fixture
def own(tmp_path: Path, session_keyring: object) -> Iterator[TokenInstall]:
    """A token and install of this test's own (it will pull the token, or lock its PIN)."""
    with token_install(tmp_path) as made:
        yield made


def test_a_token_blob_resolves_through_the_upcall(installed: TokenInstall) -> None:
    name = unique("blob")
    installed.deploy(name)
    assert installed.get(name) == VALUE
    line = installed.install.log.wait_for(name)
    assert " outcome=ok " in line and " source=blob_dir " in line and "token:" in line, line
    # Another keyring: the host cache answers, the token is not asked again.
    assert installed.get(name) == VALUE
    line = installed.install.log.wait_for(name)
    assert " source=hostcache " in line and "token:" not in line, line
    installed.lines()


def test_a_user_bound_blob_opens_for_its_user_alone(
    installed: TokenInstall, requester: Requester
) -> None:
    name = unique("bound")
    installed.deploy(name, user="nobody")
    prefix = installed.prefix

    def read() -> str:
        return get_secret(name, prefix=prefix).decode()

    assert requester.run("nobody", read) == {"ok": VALUE.decode()}
    with pytest.raises(KeyRejectedError):
        installed.get(name)  # root: refused before the token, from the recorded user
    lines = [line for line in installed.lines() if f" name={name} " in line]
    assert any("encrypted for user 'nobody', not 'root'" in line for line in lines), lines


def test_a_misnamed_blob_is_refused_before_the_token(installed: TokenInstall) -> None:
    name, other = unique("misnamed"), unique("other")
    installed.deploy(other)
    blobs = installed.install.root / "blobs"
    (blobs / f"{other}{BLOB_SUFFIX}").rename(blobs / f"{name}{BLOB_SUFFIX}")
    with pytest.raises(KeyRejectedError):
        installed.get(name)
    line = installed.install.log.wait_for(name)
    assert f"encrypted for '{other}', not '{name}'" in line and "token:" not in line, line


def test_keystore_entries_are_sealed_by_the_token(installed: TokenInstall) -> None:
    install = installed.install
    name = unique("sealed")
    Keyring.join_session()
    key = install.request(name)
    assert len(key) == 32
    Keyring.join_session()
    assert install.request(name) == key  # unsealed by the token this time
    lines = [line for line in installed.lines() if f" name={name} " in line]
    assert len(lines) == 2 and all(".sealed " in line for line in lines), lines
    # The first made the entry (the seal read the public key); the second asked the token.
    assert "seal:" in lines[0] and "unseal:" in lines[1], lines
    data = install.entry(name).read_bytes()
    assert key not in data and b"pkcs11:" in data


@pytest.mark.parametrize("stale_wait", [None, 0], ids=["default stale_wait", "stale_wait 0"])
def test_a_removed_token_is_eagain_and_a_cached_blob_answers_stale(
    tmp_path: Path, session_keyring: object, stale_wait: int | None
) -> None:
    settings = {} if stale_wait is None else {"stale_wait": stale_wait}
    with token_install(tmp_path, **settings) as own:
        _removed_token(own, background=stale_wait == 0)


def _removed_token(own: TokenInstall, *, background: bool) -> None:
    cached, never, sealed = unique("short-cached"), unique("never"), unique("sealed")
    own.deploy(cached)
    own.deploy(never)
    assert own.get(cached) == VALUE
    Keyring.join_session()
    key = own.install.request(sealed)
    own.lines()
    own.token.remove()  # the token pulled out of its slot
    time.sleep(MIN_TTL + 1)  # the host-cache entry is past its freshness, within stale_grace
    assert own.get(cached) == VALUE
    line = own.install.log.wait_for(cached)
    assert " outcome=stale " in line, line
    if background or "not reachable" not in line:
        # The token did not answer within stale_wait (0 here, or a loaded machine): the request
        # was answered stale then, and the refresh, gone on in the background, logs a line of
        # its own once the token says it is not there. That line is the event to wait for.
        assert "refreshing in the background" in line, line
        line = own.install.log.wait_for(cached)
        assert " source=background " in line and " outcome=unavailable " in line, line
    assert "not reachable" in line, line
    with pytest.raises(TemporarilyUnavailableError):
        own.get(never)
    line = own.install.log.wait_for(never)
    assert " outcome=unavailable " in line and "not reachable" in line, line
    Keyring.join_session()
    with pytest.raises(TemporarilyUnavailableError):
        own.install.request(sealed)
    assert key  # made while the token was there; nothing without it
    own.lines()


def test_a_module_gone_is_eagain(tmp_path: Path, session_keyring: object) -> None:
    copy = tmp_path / "module" / "libsofthsm2.so"
    copy.parent.mkdir()
    with system_token() as probe:
        shutil.copy(probe.module, copy)
    with token_install(tmp_path, module=str(copy)) as made:
        before, after = unique("module"), unique("module")
        made.deploy(before)
        made.deploy(after)
        assert made.get(before) == VALUE
        copy.unlink()  # the module uninstalled (a YubiKey's ykcs11 removed, say)
        with pytest.raises(TemporarilyUnavailableError):
            made.get(after)
        line = made.install.log.wait_for(after)
        assert " outcome=unavailable " in line and "does not exist" in line, line
        made.lines()


def test_a_wrong_pin_is_refused_once_and_never_retried(own: TokenInstall) -> None:
    first, second, third = unique("pin1"), unique("pin2"), unique("pin3")
    for name in (first, second, third):
        own.deploy(name)
    assert not int(token_op(own.token, "flags")) & CKF_USER_PIN_COUNT_LOW  # type: ignore[call-overload]
    wrong = f"kmst-wrong-{secrets.token_hex(4)}"
    write_root_file(own.pin, wrong + "\n", 0o600)
    with pytest.raises(KeyRejectedError):
        own.get(first)
    line = own.install.log.wait_for(first)
    assert " outcome=refused " in line and "refused the PIN" in line, line
    assert line.startswith("<83>"), line  # an alarm: authpriv (10) * 8 + LOG_ERR (3)
    flags = int(token_op(own.token, "flags"))  # type: ignore[call-overload]
    assert flags & CKF_USER_PIN_COUNT_LOW
    assert not flags & (CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_LOCKED)
    # The right PIN back in the file: still no login until a person logs in once by hand.
    write_root_file(own.pin, own.token.user_pin + "\n", 0o600)
    with pytest.raises(KeyRejectedError):
        own.get(second)
    line = own.install.log.wait_for(second)
    assert "since the last successful login" in line, line
    assert int(token_op(own.token, "flags")) == flags  # type: ignore[call-overload]
    assert token_op(own.token, "login", pin=own.token.user_pin) is True
    assert own.get(third) == VALUE
    for line in own.lines():
        assert wrong not in line, line
