"""`kmskeys encrypt NAME --to pkcs11:...|FILE.pem` and `kmskeys inspect` of a token blob, through
the real `kmskeys` script: a SoftHSM2 token initialised by the test, and the same key's public
half exported as PEM (what a CI runner without the token uses). The token opens what was made.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from encryptor.errors import EXIT_INPUT, EXIT_USAGE
from kmskeys.tokenblob import parse_token_blob
from tests.support.softhsm import Token, run_child, softhsm_token

pytestmark = pytest.mark.tokens

KMSKEYS = Path(sys.executable).with_name("kmskeys")
SECRET = b"kmst-token-cli-secret"

_CHILD = """
import base64
from resolver.pkcs11seal import TokenSession, TokenSettings, public_key
from kmskeys.tokenblob import parse_token_blob

def main(p):
    s = TokenSettings(p["module"], p["label"], p["key"], pin_file=p["pin_file"])
    if p["op"] == "public":
        return base64.b64encode(public_key(s)).decode()
    with TokenSession(s) as token:
        return token.open_blob(parse_token_blob(p["blob"]), p["name"], p.get("user")).decode()
"""


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    """The module's SoftHSM2 token (a configuration of its own)."""
    with softhsm_token(tmp_path_factory.mktemp("softhsm")) as made:
        yield made


def child(token: Token, op: str, pin_file: Path, **payload: object) -> object:
    """The token's public key, or a blob opened by the token, in a fresh process."""
    base = {"module": token.module, "label": token.label, "key": token.key_label, "op": op}
    got = run_child(_CHILD, token.env(), {**base, "pin_file": str(pin_file), **payload})
    assert "ok" in got, got
    return got["ok"]


def kmskeys(token: Token, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The real `kmskeys` script, with the token's configuration in its environment."""
    env = {k: v for k, v in token.env().items() if not k.startswith("AWS_")}
    env.pop("KMSKEYS_KEY_ID", None)
    return subprocess.run(
        [str(KMSKEYS), *args], input=stdin, capture_output=True, env=env, timeout=120, check=False
    )


def uri(token: Token) -> str:
    """The RFC 7512 URI of the token's key, as `--to` takes it."""
    return f"pkcs11:token={token.label};object={token.key_label}?module-path={token.module}"


def test_encrypt_to_the_token_and_the_token_opens_it(token: Token, tmp_path: Path) -> None:
    pin = token.write_pin(tmp_path / "token.pin")
    done = kmskeys(
        token, "encrypt", "db/password", "--to", uri(token), "--user", "alice",
        "--not-after", "+1d", "--context", "team=infra", stdin=SECRET,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode().strip()
    assert text.startswith("kmsp2:") and SECRET not in done.stdout + done.stderr
    assert b"BLOB_DIR/db/password.kmsp" in done.stderr and b"token:db/password" in done.stderr
    blob = parse_token_blob(text)
    assert (blob.name, blob.user, dict(blob.metadata)["team"]) == ("db/password", "alice", "infra")
    assert child(token, "open", pin, blob=text, name="db/password", user="alice") == SECRET.decode()


def test_encrypt_to_an_exported_pem_needs_no_token(token: Token, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    pin = token.write_pin(tmp_path / "token.pin")
    spki = base64.b64decode(str(child(token, "public", pin)))
    pem = tmp_path / "token-key.pem"
    public = serialization.load_der_public_key(spki)
    pem.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    out = tmp_path / "app.kmsp"
    done = kmskeys(token, "encrypt", "app", "--to", str(pem), "--output", str(out), stdin=SECRET)
    assert done.returncode == 0, done.stderr
    text = out.read_text().strip()
    assert child(token, "open", pin, blob=text, name="app") == SECRET.decode()


def test_inspect_shows_a_token_blob_and_refuses_a_misnamed_one(
    token: Token, tmp_path: Path
) -> None:
    made = kmskeys(token, "encrypt", "db", "--to", uri(token), "--user", "www", stdin=SECRET)
    path = tmp_path / "db.kmsp"
    path.write_bytes(made.stdout)
    shown = kmskeys(token, "inspect", str(path))
    assert shown.returncode == 0, shown.stderr
    rows = dict(line.split(None, 1) for line in shown.stdout.decode().splitlines())
    assert rows["version"] == "2 (token blob)"
    assert rows["name"] == "db: opens only when requested as token:db"
    assert rows["user"] == "www: opens only for the host user www"
    assert rows["algorithm"] == "RSA-OAEP-SHA1+AES-256-GCM"
    blob = parse_token_blob(path.read_text())
    assert rows["key_id"].startswith(blob.envelope.key_id.hex())
    as_json = json.loads(kmskeys(token, "inspect", "--json", "db", str(path)).stdout)
    assert (as_json["kind"], as_json["name"], as_json["check"]) == ("token", "db", "match")
    wrong = kmskeys(token, "inspect", "dbx", str(path))
    assert wrong.returncode == EXIT_INPUT
    assert (
        wrong.stderr.decode().strip() == "kmskeys inspect: blob was encrypted for 'db', not 'dbx'"
    )
    bad_user = kmskeys(token, "inspect", "--user", "root", "db", str(path))
    assert bad_user.returncode == EXIT_INPUT and b"for user 'www', not 'root'" in bad_user.stderr


def test_to_refuses_kms_only_options_and_bad_targets(token: Token, tmp_path: Path) -> None:
    raw = kmskeys(token, "encrypt", "x", "--to", uri(token), "--raw", stdin=SECRET)
    assert raw.returncode == EXIT_USAGE and b"--to makes a token blob" in raw.stderr
    missing = kmskeys(token, "encrypt", "x", "--to", str(tmp_path / "absent.pem"), stdin=SECRET)
    assert missing.returncode == EXIT_INPUT and b"not a readable PEM public key" in missing.stderr
    no_token = uri(token).replace(token.label, "kmst-no-such-token")
    gone = kmskeys(token, "encrypt", "x", "--to", no_token, stdin=SECRET)
    assert gone.returncode == EXIT_INPUT and b"cannot read the public key" in gone.stderr
    for done in (raw, missing, gone):
        assert SECRET not in done.stdout + done.stderr
