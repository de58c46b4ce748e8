"""The library API (`encryptor.encrypt`) against in-process moto, and botocore error mapping."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto import mock_aws

import encryptor
from encryptor import kms
from encryptor.errors import (
    EXIT_ACCESS_DENIED,
    EXIT_KEY_UNAVAILABLE,
    EXIT_KMS_UNAVAILABLE,
    EXIT_NO_CREDENTIALS,
    EXIT_NO_REGION,
    EXIT_THROTTLED,
    EXIT_UNREACHABLE,
)
from encryptor.expiry import parse_when
from kmskeys import envelope
from kmskeys.blob import (
    CONTEXT_NOT_AFTER,
    MODE_DIRECT,
    MODE_ENVELOPE,
    BlobMismatchError,
    parse_blob,
)
from kmskeys.contract import KMS_PLAINTEXT_MAX as DIRECT_MAX
from kmskeys.contract import USER_PAYLOAD_MAX as MAX_SECRET
from tests.encryptor.conftest import assert_no_plaintext, open_blob, secret_of
from tests.support.kms_emulator import TEST_CREDENTIALS, free_port

pytestmark = pytest.mark.unit


@pytest.fixture
def kms_client(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An in-process moto KMS client with test credentials."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in aws_env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    with mock_aws():
        yield boto3.client("kms", region_name=TEST_CREDENTIALS["AWS_REGION"])


@pytest.fixture
def key(kms_client: Any) -> str:
    arn: str = kms_client.create_key()["KeyMetadata"]["Arn"]
    return arn


@pytest.mark.parametrize(
    ("size", "mode"),
    [
        (1, MODE_DIRECT),
        (DIRECT_MAX, MODE_DIRECT),
        (DIRECT_MAX + 1, MODE_ENVELOPE),
        (MAX_SECRET, MODE_ENVELOPE),
    ],
)
def test_round_trip(kms_client: Any, key: str, size: int, mode: str) -> None:
    plaintext = secret_of(size)
    blob = encryptor.encrypt(plaintext, "app/db", key, client=kms_client)
    assert blob.mode == mode
    assert blob.key_arn == key
    text = blob.to_text()
    assert parse_blob(text) == blob
    assert open_blob(kms_client, text, "app/db") == plaintext
    assert_no_plaintext(text, repr(blob))


def test_forced_envelope_for_a_small_secret(kms_client: Any, key: str) -> None:
    plaintext = secret_of(40)
    blob = encryptor.encrypt(plaintext, "small", key, envelope=True, client=kms_client)
    assert blob.mode == MODE_ENVELOPE
    assert open_blob(kms_client, blob.to_text(), "small") == plaintext


def test_direct_mode_refuses_more_than_kms_takes(kms_client: Any, key: str) -> None:
    with pytest.raises(encryptor.InputError, match="at most 4096"):
        encryptor.encrypt(secret_of(DIRECT_MAX + 1), "n", key, envelope=False, client=kms_client)


@pytest.mark.parametrize("envelope_mode", [False, True])
@pytest.mark.parametrize("user", [None, "www-data"])
def test_the_blob_records_its_name_and_user(
    kms_client: Any, key: str, envelope_mode: bool, user: str | None
) -> None:
    plaintext = secret_of(64)
    blob = encryptor.encrypt(
        plaintext, "app/db-password", key, user=user, envelope=envelope_mode, client=kms_client
    )
    parsed = parse_blob(blob.to_text())
    assert (parsed.version, parsed.name, parsed.user) == (2, "app/db-password", user)
    assert parsed.binds_user is (user is not None)
    assert open_blob(kms_client, blob.to_text(), "app/db-password", user) == plaintext


@pytest.mark.parametrize("envelope_mode", [False, True])
def test_blob_is_bound_to_its_name(kms_client: Any, key: str, envelope_mode: bool) -> None:
    plaintext = secret_of(64)
    text = encryptor.encrypt(
        plaintext, "right", key, envelope=envelope_mode, client=kms_client
    ).to_text()
    # Refused locally, naming both names, before any KMS call ...
    with pytest.raises(BlobMismatchError, match="encrypted for 'right', not 'wrong'"):
        open_blob(kms_client, text, "wrong")
    # ... and without the recorded name (its version-1 form) KMS still refuses: the context
    # binds the name, the record is only a check.
    stripped = parse_blob(text).identity()
    with pytest.raises(ClientError, match="InvalidCiphertextException"):
        open_blob(kms_client, stripped, "wrong")
    assert open_blob(kms_client, stripped, "right") == plaintext


@pytest.mark.parametrize("envelope_mode", [False, True])
def test_blob_is_bound_to_its_user(kms_client: Any, key: str, envelope_mode: bool) -> None:
    plaintext = secret_of(64)
    text = encryptor.encrypt(
        plaintext, "db", key, user="alice", envelope=envelope_mode, client=kms_client
    ).to_text()
    assert parse_blob(text).binds_user
    assert open_blob(kms_client, text, "db", "alice") == plaintext
    with pytest.raises(BlobMismatchError, match="encrypted for user 'alice', not 'bob'"):
        open_blob(kms_client, text, "db", "bob")
    with pytest.raises(ClientError, match="InvalidCiphertextException"):
        open_blob(kms_client, parse_blob(text).identity(), "db", "bob")


def test_unbound_blob_does_not_decrypt_with_a_user_added(kms_client: Any, key: str) -> None:
    text = encryptor.encrypt(secret_of(8), "db", key, client=kms_client).to_text()
    blob = parse_blob(text)
    context = {**blob.encryption_context("db", None), "kmskeys_user": "alice"}
    with pytest.raises(ClientError, match="InvalidCiphertextException"):
        kms_client.decrypt(CiphertextBlob=blob.ciphertext, EncryptionContext=context)


def test_metadata_is_authenticated(kms_client: Any, key: str) -> None:
    blob = encryptor.encrypt(
        secret_of(16),
        "db",
        key,
        not_after="+1d",
        context={"env": "prod"},
        client=kms_client,
    )
    assert blob.metadata["env"] == "prod"
    assert blob.not_after is not None
    context = blob.encryption_context("db", None)
    context["env"] = "dev"
    with pytest.raises(ClientError, match="InvalidCiphertextException"):
        kms_client.decrypt(CiphertextBlob=blob.ciphertext, EncryptionContext=context)


def test_envelope_seal_binds_the_aad_too(kms_client: Any, key: str) -> None:
    plaintext = secret_of(5000)
    blob = encryptor.encrypt(plaintext, "big", key, user="alice", client=kms_client)
    context = blob.encryption_context("big", "alice")
    data_key = kms_client.decrypt(CiphertextBlob=blob.ciphertext, EncryptionContext=context)[
        "Plaintext"
    ]
    assert envelope.open_sealed(blob, context, data_key) == plaintext
    with pytest.raises(envelope.EnvelopeError, match="does not authenticate"):
        envelope.open_sealed(blob, {**context, "kmskeys_user": "bob"}, data_key)


def test_raw_is_the_legacy_form(kms_client: Any, key: str) -> None:
    plaintext = secret_of(100)
    blob = encryptor.encrypt_raw(plaintext, key, client=kms_client)
    text = blob.to_text()
    assert not text.startswith("kmsk")
    assert parse_blob(text, allow_legacy=True) == blob
    assert kms_client.decrypt(CiphertextBlob=blob.ciphertext)["Plaintext"] == plaintext


def test_not_after_is_carried_in_utc_seconds(kms_client: Any, key: str) -> None:
    when = datetime(2099, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    blob = encryptor.encrypt(secret_of(4), "db", key, not_after=when, client=kms_client)
    assert blob.metadata[CONTEXT_NOT_AFTER] == "2099-05-06T07:08:09Z"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"plaintext": b""}, "empty"),
        ({"plaintext": b"x" * (MAX_SECRET + 1)}, "user` key cannot hold"),
        ({"name": "../etc"}, "secret name"),
        ({"name": ""}, "empty"),
        ({"user": "bad user"}, "--user"),
        ({"user": "u" * 256}, "--user: a user name is 1 to 255"),
        ({"context": {"kmskeys_name": "x"}}, "reserved"),
        ({"context": {"kmskeys_not_after": "2099-01-01T00:00:00Z"}}, "reserved"),
        ({"context": {"bad key": "v"}}, "context keys"),
        ({"context": {"k": ""}}, "non-empty"),
        ({"context": {"k": "line\nbreak"}}, "printable"),
        ({"not_after": "2001-01-01"}, "not in the future"),
        ({"not_after": "2099-01-01T00:00:00"}, "time zone"),
        ({"not_after": "+3x"}, "ISO 8601"),
        ({"key_id": ""}, "--key-id"),
    ],
)
def test_bad_input_is_refused_before_kms(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"plaintext": b"x", "name": "db", "key_id": "alias/k"}
    args.update(kwargs)
    # No client and no endpoint: reaching KMS would fail differently.
    with pytest.raises(encryptor.InputError, match=message):
        encryptor.encrypt(args.pop("plaintext"), args.pop("name"), args.pop("key_id"), **args)


def test_parse_when_relative_and_absolute() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_when("+30d", now=now) == now + timedelta(days=30)
    assert parse_when("+12h", now=now) == now + timedelta(hours=12)
    assert parse_when("+2w", now=now) == now + timedelta(weeks=2)
    assert parse_when("2031-02-03", now=now) == datetime(2031, 2, 3, tzinfo=UTC)
    assert parse_when("2031-02-03T04:05:06+02:00", now=now) == datetime(
        2031, 2, 3, 2, 5, 6, tzinfo=UTC
    )
    assert parse_when("2031-02-03T04:05:06Z", now=now) == datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)
    for bad in ("+0d", "+d", "+-1d", "tomorrow", "+999999999w"):
        with pytest.raises(encryptor.InputError):
            parse_when(bad, now=now)


# --- botocore failures become one class each (Stubber injects what moto cannot produce) ---


@pytest.mark.parametrize(
    ("code", "cls", "exit_code"),
    [
        ("DisabledException", encryptor.KeyUnavailableError, EXIT_KEY_UNAVAILABLE),
        ("KMSInvalidStateException", encryptor.KeyUnavailableError, EXIT_KEY_UNAVAILABLE),
        ("NotFoundException", encryptor.KeyUnavailableError, EXIT_KEY_UNAVAILABLE),
        ("AccessDeniedException", encryptor.AccessDeniedError, EXIT_ACCESS_DENIED),
        ("ThrottlingException", encryptor.ThrottledError, EXIT_THROTTLED),
        ("UnrecognizedClientException", encryptor.NoCredentialsError, EXIT_NO_CREDENTIALS),
        ("KMSInternalException", encryptor.KmsUnavailableError, EXIT_KMS_UNAVAILABLE),
        ("KeyUnavailableException", encryptor.KmsUnavailableError, EXIT_KMS_UNAVAILABLE),
        ("SomethingNewException", encryptor.KmsError, 1),
    ],
)
@pytest.mark.parametrize("size", [10, DIRECT_MAX + 1])
def test_client_errors_are_classified(
    code: str, cls: type[encryptor.EncryptorError], exit_code: int, size: int
) -> None:
    client = boto3.client(
        "kms",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    plaintext = secret_of(size)
    with Stubber(client) as stub:
        operation = "generate_data_key" if size > DIRECT_MAX else "encrypt"
        stub.add_client_error(operation, service_error_code=code, service_message="injected")
        with pytest.raises(cls) as caught:
            encryptor.encrypt(plaintext, "db", "alias/k", client=client)
    assert type(caught.value) is cls
    assert caught.value.exit_code == exit_code
    assert isinstance(caught.value.__cause__, ClientError)
    assert "\n" not in str(caught.value)
    assert_no_plaintext(str(caught.value))


def test_missing_region(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in aws_env.items():
        if key.startswith("AWS_") and key not in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(key, value)
    with pytest.raises(encryptor.NoRegionError) as caught:
        encryptor.encrypt(b"x", "db", "alias/k")
    assert caught.value.exit_code == EXIT_NO_REGION


def test_missing_credentials(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in aws_env.items():
        if key.startswith("AWS_") and "ACCESS_KEY" not in key:
            monkeypatch.setenv(key, value)
    with pytest.raises(encryptor.NoCredentialsError) as caught:
        encryptor.encrypt(b"x", "db", "alias/k", endpoint_url=f"http://127.0.0.1:{free_port()}")
    assert caught.value.exit_code == EXIT_NO_CREDENTIALS


def test_unreachable_endpoint(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in aws_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(encryptor.EndpointUnreachableError) as caught:
        encryptor.encrypt(b"x", "db", "alias/k", endpoint_url=f"http://127.0.0.1:{free_port()}")
    assert caught.value.exit_code == EXIT_UNREACHABLE


def test_malformed_endpoint_is_a_usage_error(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in aws_env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(encryptor.UsageError, match="endpoint"):
        kms.make_client(endpoint_url="not a url")


def test_client_uses_standard_retries_and_env(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in aws_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    client = kms.make_client()
    assert client.meta.region_name == "eu-west-3"
    assert client.meta.endpoint_url == "http://127.0.0.1:1"
    assert client.meta.config.retries is not None
    assert client.meta.config.retries["mode"] == "standard"
    explicit = kms.make_client(region="ap-south-1", endpoint_url="http://127.0.0.1:2")
    assert explicit.meta.region_name == "ap-south-1"
    assert explicit.meta.endpoint_url == "http://127.0.0.1:2"


def test_unknown_profile_is_a_credentials_error(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in aws_env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(encryptor.NoCredentialsError):
        kms.make_client(profile="kmst-no-such-profile")


def test_write_atomic_mode_and_no_leftovers(tmp_path: Path) -> None:
    from encryptor.files import write_atomic

    target = tmp_path / "sub" / "db.kms"
    write_atomic(target, b"one\n")
    write_atomic(target, b"two\n")
    assert target.read_bytes() == b"two\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["db.kms"]


def test_write_atomic_failure_is_an_output_error(tmp_path: Path) -> None:
    from encryptor.files import write_atomic

    (tmp_path / "dir.kms").mkdir()
    with pytest.raises(encryptor.OutputError):
        write_atomic(tmp_path / "dir.kms", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.kms"]


def test_the_leak_check_catches_a_leak() -> None:
    plaintext = secret_of(200)
    with pytest.raises(AssertionError):
        assert_no_plaintext(b"error: " + plaintext[57:120])
    assert_no_plaintext(b"error: nothing secret here")
