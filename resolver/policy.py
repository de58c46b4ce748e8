"""Local policy checked before any KMS call: who may ask for a name, which keys and regions a
blob may use, and blob expiry."""

from __future__ import annotations

import pwd
from datetime import UTC, datetime

from kmskeys.blob import Blob, BlobFormatError
from resolver.config import Config
from resolver.errors import RefusedError


def user_name(uid: int) -> str | None:
    """The passwd name of `uid` (the kernel's %u), or None if it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def check_allowed(
    config: Config, name: str, uid: int, user: str | None, prefix: str | None = None
) -> None:
    """Refuse unless the first `[names."GLOB"]` rule matching `name` admits the requester
    (the table of the backend serving `prefix`, e.g. `[stored."GLOB"]`)."""
    rule = config.rule_for(name, prefix)
    if rule is not None and not rule.allows(user, uid):
        table = config.policy_table(prefix)
        raise RefusedError(f"policy: {table} {rule.pattern!r} do not allow this user")


def check_blob(blob: Blob, user: str | None, now: datetime | None = None) -> None:
    """Refuse an expired blob, or a user-bound one for a uid without a user name."""
    try:
        not_after = blob.not_after
    except BlobFormatError as exc:
        raise RefusedError(exc.reason) from None
    # KMS authenticates not_after through the context; checking it here saves the call.
    if not_after is not None and (now or datetime.now(UTC)) > not_after:
        raise RefusedError(f"blob expired at {not_after:%Y-%m-%dT%H:%M:%SZ}")
    if blob.binds_user and user is None:
        raise RefusedError("blob is bound to a user, but the requesting uid has no user name")


def check_key(config: Config, blob: Blob) -> tuple[str, str]:
    """The (KeyId, region) to decrypt `blob` with, or RefusedError: the blob never chooses.

    Strict mode: the blob's key must be one of `key_arns`. Discovery mode: any key of the
    configured accounts and partition, in a configured region. A legacy blob names no key; it
    gets the one key_arns entry of the first region, and is refused when that is ambiguous.
    """
    regions = config.regions
    if blob.key_arn is None:
        keys = [arn for arn in config.key_arns if regions and arn.split(":")[3] == regions[0]]
        if len(keys) != 1:
            raise RefusedError(
                "legacy blob names no key: key_arns must hold exactly one key in "
                f"{regions[0] if regions else 'the region'} for legacy blobs"
            )
        return keys[0], regions[0]
    parts = blob.key_arn.split(":")
    region = parts[3] if len(parts) == 6 else ""
    if config.discovery:
        if (
            len(parts) != 6
            or parts[:3] != ["arn", config.discovery_partition, "kms"]
            or parts[4] not in config.discovery_accounts
            or not parts[5].startswith("key/")
        ):
            raise RefusedError("key not allowed: the blob's key is outside discovery_accounts")
    elif not config.key_arns:
        raise RefusedError("no key allowed: the config lists no key_arns (strict mode)")
    elif blob.key_arn not in config.key_arns:
        raise RefusedError(f"key not allowed: {blob.key_arn} is not in key_arns")
    if region not in regions:
        raise RefusedError(f"region not allowed: {region or 'none'} is not a configured region")
    return blob.key_arn, region
