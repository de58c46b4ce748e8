"""Local policy checked before any KMS call: who may ask for a name, and blob expiry."""

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
    (`[stored."GLOB"]` for a name under the stored prefix)."""
    rule = config.rule_for(name, prefix)
    if rule is not None and not rule.allows(user, uid):
        table = "stored" if prefix is not None and prefix == config.stored_prefix else "names"
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
