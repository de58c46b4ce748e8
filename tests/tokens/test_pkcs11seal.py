"""resolver.pkcs11seal against a real PKCS#11 module: a SoftHSM2 token initialised by the test.

Each token operation runs in a fresh interpreter (SoftHSM reads SOFTHSM2_CONF at C_Initialize,
once per process, as the resolver's one-request process does). The PIN is never in a message,
and a wrong PIN costs the token exactly one try: the flags the token reports afterwards show it.
"""

from __future__ import annotations

import base64
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.softhsm import Token, run_child, softhsm_token

pytestmark = pytest.mark.tokens

SECRET = "s3cret-payload-\u00e9"
CKF_USER_PIN_COUNT_LOW, CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED = 0x10000, 0x20000, 0x40000

_CHILD = """
import base64, os
from resolver.pkcs11seal import TokenSession, TokenSettings, public_key, read_pin
from kmskeys.tokenblob import parse_token_blob, seal_blob, seal_entry, TokenEnvelope

def settings(p):
    return TokenSettings(p["module"], p["label"], p["key"], pin_file=p.get("pin_file"),
                         pin_credential=p.get("pin_credential"),
                         key_id=bytes.fromhex(p["key_id"]) if p.get("key_id") else None)

def main(p):
    s = settings(p)
    op = p["op"]
    if op == "public":
        return base64.b64encode(public_key(s)).decode()
    if op == "flags":
        import pkcs11
        return int(pkcs11.lib(p["module"]).get_token(token_label=p["label"]).flags)
    if op == "manual-login":
        import pkcs11
        with pkcs11.lib(p["module"]).get_token(token_label=p["label"]).open(user_pin=p["pin"]):
            return True
    if op == "open-blob":
        with TokenSession(s) as token:
            blob = parse_token_blob(p["blob"])
            return token.open_blob(blob, p["name"], p.get("user")).decode()
    if op == "seal-entry":
        env = seal_entry(public_key(s), base64.b64decode(p["key_b64"]), p["context"])
        return base64.b64encode(env.to_bytes()).decode()
    if op == "open-entry":
        with TokenSession(s) as token:
            env = TokenEnvelope.from_bytes(base64.b64decode(p["envelope"]))
            return base64.b64encode(token.open_entry(env, p["context"])).decode()
    raise ValueError(op)
"""


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    """The module's SoftHSM2 token, with its seal key pair."""
    with softhsm_token(tmp_path_factory.mktemp("softhsm")) as made:
        yield made


@pytest.fixture
def pin_file(token: Token, tmp_path: Path) -> Path:
    """The right PIN in a root-only file."""
    return token.write_pin(tmp_path / "token.pin")


def _call(token: Token, op: str, env: dict[str, str] | None = None, **payload: object) -> dict:
    base = {"module": token.module, "label": token.label, "key": token.key_label, "op": op}
    result = run_child(_CHILD, env or token.env(), {**base, **payload})
    # Neither PIN (right or wrong) is ever in what the child printed, raised or logged.
    printed = json.dumps(result)
    for pin in (token.user_pin, "999999", token.so_pin):
        assert pin not in printed, (pin, printed)
    return result


def _blob(token: Token, name: str = "db-password", user: str | None = None) -> str:
    from kmskeys.tokenblob import seal_blob

    spki = base64.b64decode(str(_call(token, "public", pin_file="/unused")["ok"]))
    return seal_blob(spki, SECRET.encode(), name, user=user).to_text()


def _flags(token: Token) -> int:
    return int(_call(token, "flags", pin_file="/unused")["ok"])  # type: ignore[arg-type]


def test_public_key_needs_no_pin_and_a_blob_round_trips(token: Token, pin_file: Path) -> None:
    blob = _blob(token, user="alice")
    assert blob.startswith("kmsp2:")
    got = _call(token, "open-blob", pin_file=str(pin_file), blob=blob, name="db-password",
                user="alice")  # fmt: skip
    assert got.get("ok") == SECRET, got


def test_the_blob_is_bound_to_name_and_user(token: Token, pin_file: Path) -> None:
    blob = _blob(token, user="alice")
    for name, user in (("other-name", "alice"), ("db-password", "mallory")):
        got = _call(token, "open-blob", pin_file=str(pin_file), blob=blob, name=name, user=user)
        assert got["error"] == "TokenRefusedError" and got["errno"] == errno.EKEYREJECTED, got
        assert SECRET not in json.dumps(got)


def test_a_keystore_key_seals_and_unseals_bound_to_its_context(
    token: Token, pin_file: Path
) -> None:
    key = os.urandom(32)
    context = {"kmskeys_seal": "stored", "kmskeys_scope": "user:1000", "kmskeys_name": "k"}
    sealed = _call(token, "seal-entry", pin_file="/unused", key_b64=base64.b64encode(key).decode(),
                   context=context)["ok"]  # fmt: skip
    opened = _call(token, "open-entry", pin_file=str(pin_file), envelope=sealed, context=context)
    assert base64.b64decode(str(opened["ok"])) == key
    moved = {**context, "kmskeys_scope": "user:1001"}
    got = _call(token, "open-entry", pin_file=str(pin_file), envelope=sealed, context=moved)
    assert got["error"] == "TokenRefusedError"


def test_a_wrong_pin_costs_one_try_and_is_never_retried(token: Token, tmp_path: Path) -> None:
    assert _flags(token) & (CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_LOCKED) == 0
    blob = _blob(token)
    wrong = token.write_pin(tmp_path / "wrong.pin", "999999")
    got = _call(token, "open-blob", pin_file=str(wrong), blob=blob, name="db-password")
    assert got["error"] == "TokenPinError" and got["errno"] == errno.EKEYREJECTED, got
    assert "refused the PIN" in str(got["message"]) and got["context"] is None
    # The token recorded one failure, nothing more: not locked, not down to its last try.
    flags = _flags(token)
    assert flags & CKF_USER_PIN_COUNT_LOW
    assert not flags & (CKF_USER_PIN_LOCKED | CKF_USER_PIN_FINAL_TRY)
    # Later requests do not log in at all, even with the right PIN, until a person does.
    right = token.write_pin(tmp_path / "right.pin")
    got = _call(token, "open-blob", pin_file=str(right), blob=blob, name="db-password")
    assert got["error"] == "TokenPinError" and "since the last successful login" in got["message"]
    assert _flags(token) == flags
    assert _call(token, "manual-login", pin_file="/unused", pin=token.user_pin)["ok"] is True
    assert not _flags(token) & CKF_USER_PIN_COUNT_LOW
    got = _call(token, "open-blob", pin_file=str(right), blob=blob, name="db-password")
    assert got.get("ok") == SECRET


def test_a_missing_module_or_token_is_unavailable(token: Token, pin_file: Path) -> None:
    blob = _blob(token)
    for kwargs in ({"module": "/nonexistent/libpkcs11.so"}, {"label": "no-such-token"}):
        got = _call(token, "open-blob", pin_file=str(pin_file), blob=blob, name="db-password",
                    **kwargs)  # fmt: skip
        assert got["error"] == "TokenUnavailableError" and got["errno"] == errno.EAGAIN, got


def test_a_removed_token_is_unavailable(token: Token, pin_file: Path, tmp_path: Path) -> None:
    """The same module with the token's directory gone: the slot is empty."""
    blob = _blob(token)
    empty = tmp_path / "empty-tokens"
    empty.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(token.conf.read_text().replace(str(token.directory / "tokens"), str(empty)))
    env = {**token.env(), "SOFTHSM2_CONF": str(conf)}
    got = _call(token, "open-blob", env=env, pin_file=str(pin_file), blob=blob, name="db-password")
    assert got["error"] == "TokenUnavailableError" and got["errno"] == errno.EAGAIN, got


def test_unsafe_pin_files_are_refused(token: Token, tmp_path: Path) -> None:
    blob = _blob(token)
    cases = {}
    cases["group-readable"] = token.write_pin(tmp_path / "g.pin", mode=0o640)
    cases["world-readable"] = token.write_pin(tmp_path / "w.pin", mode=0o604)
    foreign = token.write_pin(tmp_path / "u.pin")
    os.chown(foreign, 65534, 65534)
    cases["not root's"] = foreign
    link = tmp_path / "link.pin"
    link.symlink_to(token.write_pin(tmp_path / "target.pin"))
    cases["a link"] = link
    cases["missing"] = tmp_path / "absent.pin"
    for what, path in cases.items():
        got = _call(token, "open-blob", pin_file=str(path), blob=blob, name="db-password")
        assert got["error"] == "TokenPinError", (what, got)
    # None of these reached the token: no failed attempt recorded.
    assert not _flags(token) & CKF_USER_PIN_COUNT_LOW


def test_the_pin_may_come_from_a_systemd_credential(token: Token, tmp_path: Path) -> None:
    blob = _blob(token)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    token.write_pin(creds / "kmskeys-token-pin", mode=0o400)
    env = {**token.env(), "CREDENTIALS_DIRECTORY": str(creds)}
    got = _call(token, "open-blob", env=env, pin_credential="kmskeys-token-pin", blob=blob,
                name="db-password")  # fmt: skip
    assert got.get("ok") == SECRET, got
    # Without the resolver's own $CREDENTIALS_DIRECTORY there is no PIN, and no guess.
    got = _call(token, "open-blob", pin_credential="kmskeys-token-pin", blob=blob,
                name="db-password")  # fmt: skip
    assert got["error"] == "TokenPinError" and "CREDENTIALS_DIRECTORY" in got["message"]


def test_a_blob_for_another_key_or_a_replaced_key_is_refused(token: Token, pin_file: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from kmskeys.tokenblob import seal_blob

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    spki = other.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    blob = seal_blob(spki, b"x", "db-password").to_text()
    got = _call(token, "open-blob", pin_file=str(pin_file), blob=blob, name="db-password")
    assert got["error"] == "TokenRefusedError" and "another token key" in got["message"]
    # A pinned key id that the token's key does not match: refused before any login.
    got = _call(token, "open-blob", pin_file=str(pin_file), blob=_blob(token),
                name="db-password", key_id="00" * 32)  # fmt: skip
    assert got["error"] == "TokenRefusedError" and "replaced" in got["message"]
