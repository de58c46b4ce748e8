"""The real `kmskeys encrypt / inspect / bundle` scripts against a moto server over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from encryptor.errors import (
    EXIT_ACCESS_DENIED,
    EXIT_INPUT,
    EXIT_KEY_UNAVAILABLE,
    EXIT_NO_CREDENTIALS,
    EXIT_NO_REGION,
    EXIT_THROTTLED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from kmskeys.blob import BlobMismatchError, parse_blob
from tests.encryptor.conftest import AwsErrorStub, Cli, open_blob, secret_of
from tests.support.kms_emulator import KmsEmulator

pytestmark = pytest.mark.unit

CALLOUT_NOTE = b"request-key callout info limit"


def one_line_error(proc: Any, prog: str) -> str:
    """The single stderr line of a failed command (no traceback)."""
    err = proc.stderr.decode()
    assert proc.stdout == b""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kmskeys {prog}: ")
    return lines[0]


@pytest.mark.parametrize(
    ("size", "mode"), [(1, "direct"), (4096, "direct"), (4097, "envelope"), (32767, "envelope")]
)
def test_encrypt_round_trip(
    kmskeys_cli: Cli, emulator: KmsEmulator, key_arn: str, size: int, mode: str
) -> None:
    plaintext = secret_of(size)
    proc = kmskeys_cli("encrypt", "app/db", "--key-id", key_arn, stdin=plaintext)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    assert text.endswith("\n") and text.count("\n") == 1
    blob = parse_blob(text)
    assert (blob.mode, blob.key_arn) == (mode, key_arn)
    assert open_blob(emulator.client(), text, "app/db") == plaintext
    # Only blobs too long for callout info get the note.
    assert (CALLOUT_NOTE in proc.stderr) == (len(text.strip()) > 4095)


def test_small_blob_fits_callout_info(kmskeys_cli: Cli, key_arn: str) -> None:
    proc = kmskeys_cli("encrypt", "db", "--key-id", key_arn, stdin=secret_of(100))
    assert proc.returncode == 0
    assert len(proc.stdout.strip()) <= 4095
    assert proc.stderr == b""


def test_input_and_output_files(
    kmskeys_cli: Cli, emulator: KmsEmulator, key_arn: str, tmp_path: Path
) -> None:
    plaintext = secret_of(300)
    (tmp_path / "secret").write_bytes(plaintext)
    out = tmp_path / "out" / "db.kms"
    proc = kmskeys_cli(
        "encrypt",
        "db",
        "--key-id",
        key_arn,
        "--input",
        str(tmp_path / "secret"),
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b""
    assert out.stat().st_mode & 0o777 == 0o644
    assert open_blob(emulator.client(), out.read_text(), "db") == plaintext
    assert sorted(p.name for p in out.parent.iterdir()) == ["db.kms"]


@pytest.mark.parametrize("size", [64, 5000])
def test_context_binds_name_and_user(
    kmskeys_cli: Cli, emulator: KmsEmulator, key_arn: str, size: int
) -> None:
    plaintext = secret_of(size)
    proc = kmskeys_cli(
        "encrypt",
        "db",
        "--key-id",
        key_arn,
        "--user",
        "alice",
        "--not-after",
        "+30d",
        "--context",
        "env=prod",
        stdin=plaintext,
    )
    assert proc.returncode == 0, proc.stderr
    text, client = proc.stdout.decode(), emulator.client()
    assert open_blob(client, text, "db", "alice") == plaintext
    for name, user in (("other", "alice"), ("db", "bob")):
        with pytest.raises(BlobMismatchError):
            open_blob(client, text, name, user)
        # The recorded name and user are a check only: KMS refuses the version-1 form too.
        with pytest.raises(client.exceptions.InvalidCiphertextException):
            open_blob(client, parse_blob(text).identity(), name, user)


def test_unit_binds_the_context_kms_checks(
    kmskeys_cli: Cli, emulator: KmsEmulator, key_arn: str
) -> None:
    for size in (100, 5000):  # direct and envelope
        plaintext = secret_of(size)
        proc = kmskeys_cli(
            "encrypt", "db", "--key-id", key_arn, "--unit", "nginx.service", stdin=plaintext
        )
        assert proc.returncode == 0, proc.stderr
        text, client = proc.stdout.decode(), emulator.client()
        assert parse_blob(text).unit == "nginx.service"
        assert open_blob(client, text, "db", None, "nginx.service") == plaintext
        with pytest.raises(BlobMismatchError):
            open_blob(client, text, "db", None, "cron.service")
        # The record is a check only: KMS refuses the version-1 form for another unit too.
        with pytest.raises(client.exceptions.InvalidCiphertextException):
            open_blob(client, parse_blob(text).identity(), "db", None, "cron.service")
    for bad in ("nginx", "system.slice", "a b.service"):
        refused = kmskeys_cli("encrypt", "db", "--key-id", key_arn, f"--unit={bad}", stdin=b"x")
        assert refused.returncode == EXIT_INPUT and "--unit" in one_line_error(refused, "encrypt")
    raw = kmskeys_cli("encrypt", "db", "--key-id", key_arn, "--raw", "--unit", "a.service")
    assert raw.returncode == EXIT_USAGE


def test_raw_is_unbound_base64(kmskeys_cli: Cli, emulator: KmsEmulator, key_arn: str) -> None:
    plaintext = secret_of(50)
    proc = kmskeys_cli("encrypt", "db", "--key-id", key_arn, "--raw", stdin=plaintext)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode().strip()
    assert not text.startswith("kmsk")
    blob = parse_blob(text, allow_legacy=True)
    assert emulator.client().decrypt(CiphertextBlob=blob.ciphertext)["Plaintext"] == plaintext
    bad = kmskeys_cli("encrypt", "db", "--key-id", key_arn, "--raw", "--user", "a", stdin=b"x")
    assert bad.returncode == EXIT_USAGE


def test_inspect_has_the_same_shape_for_both_modes(
    kmskeys_cli: Cli, key_arn: str, tmp_path: Path
) -> None:
    blobs = {}
    for size in (10, 6000):
        proc = kmskeys_cli(
            "encrypt", "db", "--key-id", key_arn, "--not-after", "2099-01-01", stdin=secret_of(size)
        )
        blobs[size] = proc.stdout.decode().strip()
    texts, jsons = [], []
    for text in blobs.values():
        shown = kmskeys_cli("inspect", text)
        assert shown.returncode == 0, shown.stderr
        texts.append(shown.stdout.decode())
        as_json = kmskeys_cli("inspect", "--json", text)
        jsons.append(json.loads(as_json.stdout))
    labels = [[line.split()[0] for line in t.splitlines()] for t in texts]
    assert labels[0] == labels[1]
    assert labels[0] == [
        "version",
        "mode",
        "name",
        "user",
        "unit",
        "not_after",
        "key_arn",
        "size",
        "context",
    ]
    assert jsons[0].keys() == jsons[1].keys()
    assert [j["mode"] for j in jsons] == ["direct", "envelope"]
    assert [j["fits_callout"] for j in jsons] == [True, False]
    for j in jsons:
        assert j["key_arn"] == key_arn
        assert j["not_after"] == "2099-01-01T00:00:00Z"
        assert (j["binds_name"], j["binds_user"], j["version"]) == (True, False, 2)
        assert (j["name"], j["user"], j["check"]) == ("db", None, None)
    # From a file and from stdin, the same description.
    (tmp_path / "db.kms").write_text(blobs[10] + "\n")
    from_file = kmskeys_cli("inspect", str(tmp_path / "db.kms"))
    from_stdin = kmskeys_cli("inspect", stdin=blobs[10].encode())
    assert from_file.stdout.decode() == texts[0] == from_stdin.stdout.decode()


def test_inspect_names_the_prefix_the_apps_use(kmskeys_cli: Cli, key_arn: str) -> None:
    text = kmskeys_cli("encrypt", "db", "--key-id", key_arn, stdin=b"x").stdout.decode().strip()
    default = kmskeys_cli("inspect", text).stdout.decode()
    assert "name       db: decrypts only when requested as kms:db\n" in default
    other = kmskeys_cli("inspect", "--prefix", "app", text)
    assert other.returncode == 0, other.stderr
    assert "decrypts only when requested as app:db\n" in other.stdout.decode()
    assert "kms:db" not in other.stdout.decode()
    bad = kmskeys_cli("inspect", "--prefix", "Bad Prefix", text)
    assert bad.returncode == EXIT_USAGE and b"--prefix" in bad.stderr


def test_inspect_refuses_a_broken_blob(kmskeys_cli: Cli) -> None:
    proc = kmskeys_cli("inspect", "kmsk1:AAAA")
    assert proc.returncode == EXIT_INPUT
    assert "unknown mode" in one_line_error(proc, "inspect")


def test_bundle(kmskeys_cli: Cli, emulator: KmsEmulator, key_arn: str, tmp_path: Path) -> None:
    secrets = {"DB_PASSWORD": secret_of(20), "API_TOKEN": secret_of(40), "BIG": secret_of(5000)}
    envfile = tmp_path / "app.env"
    envfile.write_bytes(
        b"# app secrets\n"
        + b"export DB_PASSWORD=" + secrets["DB_PASSWORD"] + b"\n"
        + b"API_TOKEN='" + secrets["API_TOKEN"] + b"'\n"
        + b"BIG=" + secrets["BIG"] + b"\n"
    )  # fmt: skip
    out = tmp_path / "blobs"
    for _run in range(2):  # idempotent: the second run rewrites the same files
        proc = kmskeys_cli(
            "bundle", str(envfile), "--key-id", key_arn, "--output-dir", str(out), "--user", "www"
        )
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in out.iterdir()) == [f"{n}.kms" for n in sorted(secrets)]
        for name, value in secrets.items():
            path = out / f"{name}.kms"
            assert path.stat().st_mode & 0o777 == 0o644
            assert open_blob(emulator.client(), path.read_text(), name, "www") == value
            # Each file records the name it is deployed under, and the user.
            blob = parse_blob(path.read_text())
            assert (blob.name, blob.user) == (name, "www")
    table = proc.stdout.decode().splitlines()
    assert table[0].split() == ["NAME", "BYTES", "MODE", "BLOB", "KEY"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["DB_PASSWORD"][1:3] == ["20", "direct"]
    assert rows["BIG"][1:3] == ["5000", "envelope"]
    assert all(row[4] == key_arn for row in rows.values())


def test_bundle_bad_line_writes_nothing(kmskeys_cli: Cli, key_arn: str, tmp_path: Path) -> None:
    value = secret_of(30)
    envfile = tmp_path / "app.env"
    envfile.write_bytes(b"GOOD=" + value + b"\n\nbad line " + value + b"\n")
    out = tmp_path / "blobs"
    out.mkdir()
    (out / "GOOD.kms").write_text("previous\n")
    proc = kmskeys_cli("bundle", str(envfile), "--key-id", key_arn, "--output-dir", str(out))
    assert proc.returncode == EXIT_INPUT
    assert "line 3" in one_line_error(proc, "bundle")
    assert sorted(p.name for p in out.iterdir()) == ["GOOD.kms"]
    assert (out / "GOOD.kms").read_text() == "previous\n"


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message"),
    [
        (["encrypt", "db"], b"x", EXIT_USAGE, "--key-id is required"),
        (["encrypt", "../db", "--key-id", "k"], b"x", EXIT_INPUT, "secret name"),
        (["encrypt", "db", "--key-id", "k"], b"", EXIT_INPUT, "the secret is empty"),
        (["encrypt", "db", "--key-id", "k"], b"x" * 32768, EXIT_INPUT, "user` key cannot"),
        (["encrypt", "db", "--key-id", "k", "--context", "novalue"], b"x", EXIT_INPUT, "KEY=VALUE"),
        (["encrypt", "db", "--key-id", "k", "--not-after", "yesterday"], b"x", EXIT_INPUT, "ISO"),
        (
            ["encrypt", "db", "--key-id", "k", "--input", "/nonexistent/kmst"],
            b"",
            EXIT_INPUT,
            "read",
        ),
    ],
)
def test_input_errors(
    kmskeys_cli: Cli, args: list[str], stdin: bytes, code: int, message: str
) -> None:
    proc = kmskeys_cli(*args, stdin=stdin)
    assert proc.returncode == code
    assert message in one_line_error(proc, args[0])


def test_key_not_found(kmskeys_cli: Cli) -> None:
    bogus = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-00000000kmst"
    proc = kmskeys_cli("encrypt", "db", "--key-id", bogus, stdin=secret_of(10))
    assert proc.returncode == EXIT_KEY_UNAVAILABLE
    assert "not found" in one_line_error(proc, "encrypt")


def test_region_missing(kmskeys_cli: Cli, cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    proc = kmskeys_cli("encrypt", "db", "--key-id", "k", stdin=secret_of(10), env=env)
    assert proc.returncode == EXIT_NO_REGION
    assert "region" in one_line_error(proc, "encrypt")
    # --region is enough to fix it.
    fixed = kmskeys_cli("encrypt", "db", "--key-id", "k", "--region", "us-east-1", env=env)
    assert fixed.returncode != EXIT_NO_REGION


def test_no_credentials(kmskeys_cli: Cli, cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if "ACCESS_KEY" not in k}
    proc = kmskeys_cli("encrypt", "db", "--key-id", "k", stdin=secret_of(10), env=env)
    assert proc.returncode == EXIT_NO_CREDENTIALS
    assert "credentials" in one_line_error(proc, "encrypt").lower()


def test_unreachable_when_the_emulator_is_stopped(
    kmskeys_cli: Cli, aws_env: dict[str, str], tmp_path: Path
) -> None:
    stopped = KmsEmulator(log=tmp_path / "stopped.log").start()
    key = stopped.client().create_key()["KeyMetadata"]["Arn"]
    stopped.stop()
    env = {**aws_env, "AWS_ENDPOINT_URL": stopped.url}
    proc = kmskeys_cli("encrypt", "db", "--key-id", key, stdin=secret_of(10), env=env)
    assert proc.returncode == EXIT_UNREACHABLE
    assert stopped.url in one_line_error(proc, "encrypt")


@pytest.mark.parametrize(
    ("error", "code", "expected_requests"),
    [
        ("AccessDeniedException", EXIT_ACCESS_DENIED, 1),
        ("DisabledException", EXIT_KEY_UNAVAILABLE, 1),
        ("ThrottlingException", EXIT_THROTTLED, 3),  # botocore standard mode: 3 attempts
    ],
)
def test_aws_errors_from_the_wire(
    kmskeys_cli: Cli, aws_env: dict[str, str], error: str, code: int, expected_requests: int
) -> None:
    with AwsErrorStub(error) as stub:
        proc = kmskeys_cli(
            "encrypt",
            "db",
            "--key-id",
            "alias/kmst",
            "--endpoint-url",
            stub.url,
            stdin=secret_of(10),
            env=aws_env,
        )
    assert proc.returncode == code
    assert error in one_line_error(proc, "encrypt")
    assert stub.requests == expected_requests


def test_bundle_reports_kms_errors_and_writes_nothing(
    kmskeys_cli: Cli, aws_env: dict[str, str], tmp_path: Path
) -> None:
    envfile = tmp_path / "app.env"
    envfile.write_bytes(b"A=" + secret_of(12) + b"\n")
    out = tmp_path / "blobs"
    with AwsErrorStub("AccessDeniedException") as stub:
        proc = kmskeys_cli(
            "bundle",
            str(envfile),
            "--key-id",
            "alias/kmst",
            "--output-dir",
            str(out),
            "--endpoint-url",
            stub.url,
            env=aws_env,
        )
    assert proc.returncode == EXIT_ACCESS_DENIED
    one_line_error(proc, "bundle")
    assert not out.exists()


def test_help_offers_no_way_to_pass_a_secret_in_argv(kmskeys_cli: Cli) -> None:
    proc = kmskeys_cli("encrypt", "--help")
    assert proc.returncode == 0
    help_text = proc.stdout.decode()
    assert "--input" in help_text
    for forbidden in ("--secret", "--plaintext", "--value"):
        assert forbidden not in help_text
