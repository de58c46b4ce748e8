"""Turn one secret into a blob bound to its name (and optionally a user and a systemd unit):
the library API."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING

from encryptor import kms
from encryptor.errors import InputError, KmsError
from encryptor.expiry import parse_when
from kmskeys.blob import (
    CONTEXT_NAME,
    CONTEXT_NOT_AFTER,
    CONTEXT_UNIT,
    CONTEXT_USER,
    MODE_DIRECT,
    RESERVED_CONTEXT_PREFIX,
    VERSION,
    Blob,
    BlobFormatError,
    check_context_key,
    check_context_value,
    format_not_after,
)
from kmskeys.blobfields import check_unit_name, check_user_name
from kmskeys.contract import KMS_PLAINTEXT_MAX, USER_PAYLOAD_MAX
from kmskeys.envelope import seal
from kmskeys.errors import InvalidNameError
from kmskeys.names import validate_name

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

TOO_BIG = (
    f"the secret is over {USER_PAYLOAD_MAX} bytes: a kernel `user` key cannot hold it; "
    "store a smaller secret (e.g. a key that decrypts a file)"
)


def encrypt(
    plaintext: bytes,
    name: str,
    key_id: str,
    *,
    user: str | None = None,
    unit: str | None = None,
    not_after: datetime | str | None = None,
    context: Mapping[str, str] | None = None,
    envelope: bool | None = None,
    client: KMSClient | None = None,
    region: str | None = None,
    profile: str | None = None,
    endpoint_url: str | None = None,
) -> Blob:
    """Encrypt `plaintext` into a Blob bound to `name` (and `user`, and the systemd `unit` that
    alone may have it); `.to_text()` to deploy it.

    The blob (version 2) records `name`, `user` and `unit` too, so a resolver refuses it for
    another name, user or unit without asking KMS. A unit-bound blob decrypts only when the
    resolver reads that unit from the requester's cgroup (docs/security.md), whatever the
    resolver's policy says.

    Envelope mode is chosen above 4096 bytes unless `envelope` says otherwise. `not_after` is
    an aware datetime, ISO 8601 text or `+30d`. `client` overrides region/profile/endpoint_url.
    """
    plaintext = check_plaintext(plaintext)
    name = _name(name)
    key_id = check_key_id(key_id)
    metadata = build_metadata(not_after=not_after, context=context)
    user = None if user is None else check_user(user)
    unit = None if unit is None else check_unit(unit)
    request_context = {CONTEXT_NAME: name}
    if user is not None:
        request_context[CONTEXT_USER] = user
    if unit is not None:
        request_context[CONTEXT_UNIT] = unit
    request_context.update(metadata)

    use_envelope = len(plaintext) > KMS_PLAINTEXT_MAX if envelope is None else envelope
    if not use_envelope and len(plaintext) > KMS_PLAINTEXT_MAX:
        raise InputError(
            f"direct mode holds at most {KMS_PLAINTEXT_MAX} bytes ({len(plaintext)} given); "
            "use envelope mode"
        )
    client = client or kms.make_client(region=region, profile=profile, endpoint_url=endpoint_url)
    if use_envelope:
        generated = kms.call(
            "GenerateDataKey",
            client.generate_data_key,
            KeyId=key_id,
            KeySpec="AES_256",
            EncryptionContext=request_context,
        )
        return seal(
            key_arn=_returned_key(generated.get("KeyId")),
            name=name,
            user=user,
            unit=unit,
            metadata=metadata,
            wrapped_key=generated["CiphertextBlob"],
            data_key=generated["Plaintext"],
            context=request_context,
            plaintext=plaintext,
        )
    encrypted = kms.call(
        "Encrypt",
        client.encrypt,
        KeyId=key_id,
        Plaintext=plaintext,
        EncryptionContext=request_context,
    )
    return Blob(
        version=VERSION,
        mode=MODE_DIRECT,
        key_arn=_returned_key(encrypted.get("KeyId")),
        binds_user=user is not None,
        metadata=metadata,
        ciphertext=encrypted["CiphertextBlob"],
        # The blob records what it is for: the resolver refuses it for another name locally.
        name=name,
        user=user,
        binds_unit=unit is not None,
        unit=unit,
    )


def encrypt_raw(
    plaintext: bytes,
    key_id: str,
    *,
    client: KMSClient | None = None,
    region: str | None = None,
    profile: str | None = None,
    endpoint_url: str | None = None,
) -> Blob:
    """A legacy blob: bare KMS ciphertext with no encryption context (interoperability only)."""
    plaintext = check_plaintext(plaintext)
    key_id = check_key_id(key_id)
    if len(plaintext) > KMS_PLAINTEXT_MAX:
        raise InputError(f"a raw (legacy) blob holds at most {KMS_PLAINTEXT_MAX} bytes")
    client = client or kms.make_client(region=region, profile=profile, endpoint_url=endpoint_url)
    encrypted = kms.call("Encrypt", client.encrypt, KeyId=key_id, Plaintext=plaintext)
    return Blob(
        version=0,
        mode="legacy",
        key_arn=None,
        binds_user=False,
        ciphertext=encrypted["CiphertextBlob"],
    )


def check_plaintext(plaintext: bytes) -> bytes:
    """`plaintext` if it is non-empty bytes that fit a `user` key, else InputError."""
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise InputError(f"the secret must be bytes, not {type(plaintext).__name__}")
    plaintext = bytes(plaintext)
    if not plaintext:
        raise InputError("the secret is empty")
    if len(plaintext) > USER_PAYLOAD_MAX:
        raise InputError(TOO_BIG)
    return plaintext


def check_key_id(key_id: str) -> str:
    """`key_id` (key id, ARN, alias name or alias ARN) if it is plausible, else InputError."""
    if (
        not isinstance(key_id, str)
        or not 0 < len(key_id) <= 2048
        or not key_id.isascii()
        or not key_id.isprintable()
        or " " in key_id
    ):
        raise InputError("--key-id must be a KMS key id, key ARN, alias name or alias ARN")
    return key_id


def check_user(user: str) -> str:
    """`user` if it looks like a host user name (the resolver supplies the real one), else raise."""
    try:
        return check_user_name(user)
    except BlobFormatError as exc:
        raise InputError(f"--user: {exc.reason}") from None


def check_unit(unit: str) -> str:
    """`unit` if it can be a systemd unit that holds processes (`nginx.service`), else raise."""
    try:
        return check_unit_name(unit)
    except BlobFormatError as exc:
        raise InputError(f"--unit: {exc.reason}") from None


def build_metadata(
    *, not_after: datetime | str | None = None, context: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The authenticated metadata a blob carries: `kmskeys_not_after` plus custom entries."""
    metadata: dict[str, str] = {}
    for key, value in (context or {}).items():
        if isinstance(key, str) and key.startswith(RESERVED_CONTEXT_PREFIX):
            raise InputError(
                f"--context key {key[:40]!r}: keys starting with {RESERVED_CONTEXT_PREFIX!r} "
                "are reserved (use --user / --unit / --not-after)"
            )
        try:
            metadata[check_context_key(key)] = check_context_value(value)
        except BlobFormatError as exc:
            raise InputError(f"--context {str(key)[:40]!r}: {exc.reason}") from None
    if not_after is not None:
        when = parse_when(not_after) if isinstance(not_after, str) else not_after
        try:
            metadata[CONTEXT_NOT_AFTER] = format_not_after(when)
        except ValueError as exc:
            raise InputError(f"--not-after: {exc}") from None
    return metadata


def parse_context_option(pairs: list[str]) -> dict[str, str]:
    """`K=V` strings from `--context` into a dict; duplicates and missing `=` are errors."""
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--context {pair[:40]!r} must look like KEY=VALUE")
        if key in context:
            raise InputError(f"--context {key[:40]!r} given twice")
        context[key] = value
    return context


def _name(name: str) -> str:
    try:
        return validate_name(name)
    except InvalidNameError as exc:
        raise InputError(str(exc)) from None


def _returned_key(key_id: object) -> str:
    # The ARN KMS says it used is what the blob records and what the resolver will pin.
    if not isinstance(key_id, str) or not key_id:
        raise KmsError("KMS returned no KeyId; refusing to write a blob without its key ARN")
    return key_id
