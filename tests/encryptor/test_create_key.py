"""`kmskeys create-key`: a key and its alias in a test KMS, for a host off EC2 with no aws CLI.

The real `kmskeys` script against a moto server over HTTP: the key it makes is symmetric and
for encryption, the alias names it, a second run creates nothing, and the ARN it prints is what
`kmskeys encrypt --key-id alias/...` then records in a blob.
"""

from __future__ import annotations

import pytest

from encryptor.errors import EXIT_UNREACHABLE, EXIT_USAGE
from kmskeys.blob import parse_blob
from tests.encryptor.conftest import Cli, open_blob, secret_of
from tests.encryptor.test_cli import one_line_error
from tests.support.kms_emulator import KmsEmulator, free_port
from tests.support.names import unique

pytestmark = pytest.mark.unit


def _keys(emulator: KmsEmulator) -> list[str]:
    return [key["KeyArn"] for key in emulator.client().list_keys()["Keys"]]


def test_creates_a_symmetric_key_and_its_alias_once(
    kmskeys_cli: Cli, emulator: KmsEmulator
) -> None:
    alias = f"alias/{unique('off-ec2')}"
    before = _keys(emulator)
    made = kmskeys_cli("create-key", "--alias", alias, "--endpoint-url", emulator.url)
    assert made.returncode == 0, made.stderr
    arn = made.stdout.decode().strip()
    assert made.stdout.decode() == arn + "\n"
    assert f"created {arn} as {alias}".encode() in made.stderr
    kms = emulator.client()
    meta = kms.describe_key(KeyId=alias)["KeyMetadata"]
    assert (meta["Arn"], meta["KeySpec"], meta["KeyUsage"]) == (
        arn,
        "SYMMETRIC_DEFAULT",
        "ENCRYPT_DECRYPT",
    )
    assert _keys(emulator) == [*before, arn]
    again = kmskeys_cli("create-key", "--alias", alias, "--endpoint-url", emulator.url)
    assert (again.returncode, again.stdout) == (0, made.stdout)
    assert b"nothing created" in again.stderr
    assert _keys(emulator) == [*before, arn]
    # The ARN is what the encryptor records when given the alias.
    secret = secret_of(20)
    blob = kmskeys_cli("encrypt", "db", "--key-id", alias, stdin=secret)
    assert blob.returncode == 0, blob.stderr
    assert parse_blob(blob.stdout.decode()).key_arn == arn
    assert open_blob(kms, blob.stdout.decode(), "db") == secret


@pytest.mark.parametrize(
    "alias", ["kmskeys", "alias/", "alias/aws/kmskeys", "alias/with space", "alias/é"]
)
def test_an_alias_kms_would_refuse_is_a_usage_error(kmskeys_cli: Cli, alias: str) -> None:
    proc = kmskeys_cli("create-key", "--alias", alias)
    assert proc.returncode == EXIT_USAGE
    assert "alias" in one_line_error(proc, "create-key")


def test_an_unreachable_endpoint_creates_nothing_and_says_where(
    kmskeys_cli: Cli, emulator: KmsEmulator
) -> None:
    before = _keys(emulator)
    url = f"http://127.0.0.1:{free_port()}"
    proc = kmskeys_cli("create-key", "--alias", f"alias/{unique()}", "--endpoint-url", url)
    assert proc.returncode == EXIT_UNREACHABLE
    assert url in one_line_error(proc, "create-key")
    assert _keys(emulator) == before
