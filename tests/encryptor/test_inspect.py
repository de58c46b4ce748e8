"""`kmskeys inspect NAME FILE`: a blob made for another name or user is refused, locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from encryptor.errors import EXIT_INPUT
from kmskeys.blob import parse_blob
from tests.encryptor.conftest import AwsErrorStub, Cli
from tests.encryptor.test_cli import one_line_error

pytestmark = pytest.mark.unit


def encrypted(cli: Cli, key_arn: str, path: Path, name: str, *options: str) -> Path:
    """`kmskeys encrypt NAME --output PATH`, through the real script and moto."""
    proc = cli("encrypt", name, "--key-id", key_arn, "--output", str(path), *options, stdin=b"s")
    assert proc.returncode == 0, proc.stderr
    return path


def test_the_right_name_passes(kmskeys_cli: Cli, key_arn: str, tmp_path: Path) -> None:
    path = encrypted(kmskeys_cli, key_arn, tmp_path / "db-password.kms", "db-password")
    proc = kmskeys_cli("inspect", "db-password", str(path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[2] == "name       db-password: decrypts only when requested as kms:db-password"
    assert lines[-1] == "check      ok: made for name db-password"
    as_json = json.loads(kmskeys_cli("inspect", "--json", "db-password", str(path)).stdout)
    assert (as_json["name"], as_json["check"]) == ("db-password", "match")


def test_a_misnamed_blob_is_refused_without_aws(
    kmskeys_cli: Cli, key_arn: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    # Deployed as db-pasword.kms (the app asks for db-pasword): made for db-password.
    path = encrypted(kmskeys_cli, key_arn, tmp_path / "db-pasword.kms", "db-password")
    text = path.read_text()
    with AwsErrorStub("InternalFailure", 500) as stub:
        env = {**cli_env, "AWS_ENDPOINT_URL": stub.url}
        for args, stdin in (
            ([str(path)], b""),
            (["-"], text.encode()),
            ([text.strip()], b""),
            (["--json", str(path)], b""),
        ):
            proc = kmskeys_cli("inspect", "db-pasword", *args, stdin=stdin, env=env)
            assert proc.returncode == EXIT_INPUT
            assert one_line_error(proc, "inspect") == (
                "kmskeys inspect: blob was encrypted for 'db-password', not 'db-pasword'"
            )
        assert stub.requests == 0
    # With a single argument it is the blob, as before: described, not checked.
    alone = kmskeys_cli("inspect", str(path))
    assert alone.returncode == 0 and b"check" not in alone.stdout


def test_the_user_is_checked_too(kmskeys_cli: Cli, key_arn: str, tmp_path: Path) -> None:
    path = encrypted(kmskeys_cli, key_arn, tmp_path / "db.kms", "db", "--user", "alice")
    shown = kmskeys_cli("inspect", str(path)).stdout.decode()
    assert "user       alice: decrypts only for the host user alice\n" in shown
    good = kmskeys_cli("inspect", "--user", "alice", "db", str(path))
    assert good.returncode == 0, good.stderr
    assert good.stdout.decode().splitlines()[-1] == "check      ok: made for name db, user alice"
    bad = kmskeys_cli("inspect", "--user", "bob", "db", str(path))
    assert bad.returncode == EXIT_INPUT
    assert one_line_error(bad, "inspect").endswith("blob was encrypted for user 'alice', not 'bob'")
    hostile = kmskeys_cli("inspect", "--user", "bob\nx", "db", str(path))
    assert hostile.returncode == EXIT_INPUT and "--user" in one_line_error(hostile, "inspect")


def test_the_unit_is_shown_and_checked(kmskeys_cli: Cli, key_arn: str, tmp_path: Path) -> None:
    path = encrypted(kmskeys_cli, key_arn, tmp_path / "db.kms", "db", "--unit", "nginx.service")
    shown = kmskeys_cli("inspect", str(path)).stdout.decode()
    assert "unit       nginx.service: decrypts only for a requester the resolver finds in" in shown
    described = json.loads(kmskeys_cli("inspect", "--json", str(path)).stdout)
    assert (described["unit"], described["binds_unit"]) == ("nginx.service", True)
    good = kmskeys_cli("inspect", "--unit", "nginx.service", "db", str(path))
    assert good.returncode == 0, good.stderr
    assert (
        good.stdout.decode().splitlines()[-1]
        == "check      ok: made for name db, unit nginx.service"
    )
    bad = kmskeys_cli("inspect", "--unit", "cron.service", "db", str(path))
    assert bad.returncode == EXIT_INPUT
    reason = "blob was encrypted for unit 'nginx.service', not 'cron.service'"
    assert one_line_error(bad, "inspect").endswith(reason)
    for hostile in ("nginx", "a\nb.service"):
        refused = kmskeys_cli("inspect", "--unit", hostile, "db", str(path))
        assert refused.returncode == EXIT_INPUT and "--unit" in one_line_error(refused, "inspect")
    unbound = encrypted(kmskeys_cli, key_arn, tmp_path / "free.kms", "db")
    assert "unit       not bound" in kmskeys_cli("inspect", str(unbound)).stdout.decode()


def test_a_version_1_blob_is_described_and_said_unchecked(
    kmskeys_cli: Cli, key_arn: str, tmp_path: Path
) -> None:
    path = encrypted(kmskeys_cli, key_arn, tmp_path / "new.kms", "db-password", "--user", "www")
    old = tmp_path / "old.kms"
    old.write_text(parse_blob(path.read_text()).identity() + "\n")  # what kmskeys < 2 wrote
    shown = kmskeys_cli("inspect", str(old))
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(None, 1) for line in shown.stdout.decode().splitlines())
    assert lines["version"] == "1"
    assert "does not record it" in lines["name"] and "does not record it" in lines["user"]
    # NAME cannot be checked locally: said so, exit 0 (KMS still refuses another name).
    checked = kmskeys_cli("inspect", "--user", "other", "db-pasword", str(old))
    assert checked.returncode == 0, checked.stderr
    assert "not checked locally" in checked.stdout.decode().splitlines()[-1]
    as_json = json.loads(kmskeys_cli("inspect", "--json", "x", str(old)).stdout)
    assert (as_json["version"], as_json["name"], as_json["check"]) == (1, None, "unrecorded")


def test_legacy_and_bad_names(kmskeys_cli: Cli, key_arn: str, tmp_path: Path) -> None:
    raw = encrypted(kmskeys_cli, key_arn, tmp_path / "raw.kms", "db", "--raw")
    legacy = kmskeys_cli("inspect", "anything", str(raw))
    assert legacy.returncode == 0, legacy.stderr
    assert "nothing to check: a legacy blob" in legacy.stdout.decode()
    path = encrypted(kmskeys_cli, key_arn, tmp_path / "db.kms", "db")
    bad = kmskeys_cli("inspect", "../db", str(path))
    assert bad.returncode == EXIT_INPUT and "secret name" in one_line_error(bad, "inspect")
