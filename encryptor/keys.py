"""A KMS key and its alias for a host off EC2: `kmskeys create-key --alias alias/NAME`.

Off EC2 (a KMS emulator, a sandbox account) the resolver's config needs a key ARN, and such a
host often has no aws CLI. This makes a symmetric ENCRYPT_DECRYPT key (CreateKey) and names it
(CreateAlias). An alias that exists already is never moved: the key it names is the answer and
nothing is created, so a set-up script may run it again. Production keys, with the key policy
the resolver's role needs, come from terraform/ (modules/kms-key).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from encryptor.errors import EncryptorError, UsageError
from encryptor.kms import call, classify

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

ALIAS_PREFIX = "alias/"
# KMS reserves these for AWS managed keys; CreateAlias refuses them.
RESERVED_ALIAS_PREFIX = "alias/aws/"


def check_alias(alias: str) -> str:
    """`alias` if CreateAlias can take it (alias/NAME, not alias/aws/...); else UsageError."""
    name = alias.removeprefix(ALIAS_PREFIX)
    allowed = all((ch.isascii() and ch.isalnum()) or ch in "/_-" for ch in name)
    if not alias.startswith(ALIAS_PREFIX) or not name or not allowed or len(alias) > 256:
        raise UsageError(f"--alias must be alias/NAME (letters, digits, / _ -), not {alias!r}")
    if alias.startswith(RESERVED_ALIAS_PREFIX):
        raise UsageError(f"{alias}: the alias/aws/ names are reserved for AWS managed keys")
    return alias


def aliased_key(client: KMSClient, alias: str) -> str | None:
    """The ARN of the key `alias` names, or None if there is no such alias."""
    import botocore.exceptions

    try:
        metadata = client.describe_key(KeyId=alias)["KeyMetadata"]
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NotFoundException":
            return None
        raise classify(exc, "DescribeKey", key_id=alias) from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise classify(exc, "DescribeKey", key_id=alias) from exc
    return str(metadata["Arn"])


def create_key(client: KMSClient, alias: str, description: str) -> tuple[str, bool]:
    """(the key ARN `alias` names, whether this call created the key and the alias)."""
    check_alias(alias)
    existing = aliased_key(client, alias)
    if existing is not None:
        return existing, False
    created = call(
        "CreateKey",
        client.create_key,
        Description=description,
        KeySpec="SYMMETRIC_DEFAULT",
        KeyUsage="ENCRYPT_DECRYPT",
    )
    arn = str(created["KeyMetadata"]["Arn"])
    try:
        call("CreateAlias", client.create_alias, AliasName=alias, TargetKeyId=arn)
    except EncryptorError as exc:
        # The key exists now: say which, so that it can be aliased by hand or deleted.
        raise type(exc)(f"{exc} (key {arn} was created without its alias)") from exc
    return arn, True


__all__ = ["aliased_key", "check_alias", "create_key"]
