"""`kmskeys inspect`: what a blob says about itself, and whether it was made for a given name.

Never decrypts and never calls AWS. The name check is the resolver's own (Blob.check_request):
`kmskeys inspect NAME FILE` refuses a blob made for another name exactly as a host would.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from encryptor.errors import InputError
from encryptor.files import read_bounded
from kmskeys.blob import CONTEXT_NOT_AFTER, MAX_BLOB_CHARS, MODE_LEGACY, PREFIX, Blob, parse_blob
from kmskeys.blobfields import BlobFormatError, check_unit_name, check_user_name
from kmskeys.contract import CALLOUT_MAX

# The outcomes of a check, as `--json` shows them under "check".
MATCH = "match"
UNRECORDED = "unrecorded"
UNBOUND = "unbound"


def read_text(source: str) -> str | bytes:
    """The blob's text, given as text, as a file holding it, or as `-` (stdin)."""
    if source == "-":
        return read_bounded("-", MAX_BLOB_CHARS, "the blob")
    if source.startswith(PREFIX) and ":" in source:
        return source
    if Path(source).is_file():
        return read_bounded(source, MAX_BLOB_CHARS, "the blob")
    return source  # bare text: perhaps a legacy blob (or a token blob, kmskeys.tokenblob)


def read_blob(source: str) -> Blob:
    """The blob given as text, as a file holding it, or as `-` (stdin); legacy ones too."""
    return parse_blob(read_text(source), allow_legacy=True)


def check(blob: Blob, name: str | None, user: str | None, unit: str | None = None) -> str | None:
    """None if nothing was asked; else MATCH, UNRECORDED (version 1) or UNBOUND (legacy).

    Raises BlobMismatchError for a blob that records another name, user or unit.
    """
    for option, value, valid in (
        ("--user", user, check_user_name),
        ("--unit", unit, check_unit_name),
    ):
        if value is not None:
            try:
                valid(value)
            except BlobFormatError as exc:
                raise InputError(f"{option}: {exc.reason}") from None
    if name is None and user is None and unit is None:
        return None
    blob.check_request(name, user, unit)
    if blob.mode == MODE_LEGACY:
        return UNBOUND
    if (
        (name is not None and blob.name is None)
        or (user is not None and blob.binds_user and blob.user is None)
        or (unit is not None and blob.binds_unit and blob.unit is None)
    ):
        return UNRECORDED
    return MATCH


def describe(blob: Blob, checked: str | None) -> dict[str, Any]:
    """The description `--json` prints (and the rows are made of)."""
    not_after = blob.not_after
    size = blob.size
    return {
        "version": blob.version,
        "mode": blob.mode,
        "name": blob.name,
        "binds_name": blob.mode != MODE_LEGACY,
        "user": blob.user,
        "binds_user": blob.binds_user,
        "unit": blob.unit,
        "binds_unit": blob.binds_unit,
        "not_after": None if not_after is None else not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expired": not_after is not None and not_after <= datetime.now(UTC),
        "key_arn": blob.key_arn,
        "size": size,
        "fits_callout": size <= CALLOUT_MAX,
        "context": {k: v for k, v in blob.metadata.items() if k != CONTEXT_NOT_AFTER},
        "check": checked,
    }


def rows(
    blob: Blob, description: dict[str, Any], prefix: str, name: str | None
) -> list[tuple[str, str]]:
    """(label, text) lines of the human-readable description."""
    shown = [
        ("version", str(blob.version)),
        ("mode", blob.mode),
        ("name", _name_row(blob, prefix)),
        ("user", _user_row(blob)),
        ("unit", _unit_row(blob)),
        (
            "not_after",
            "none"
            if description["not_after"] is None
            else description["not_after"] + (" (expired)" if description["expired"] else ""),
        ),
        ("key_arn", blob.key_arn or "unknown (legacy blob)"),
        (
            "size",
            f"{description['size']} characters"
            + (
                " (fits in request-key callout info)"
                if description["fits_callout"]
                else f" (over {CALLOUT_MAX}: deploy as a file in the resolver's blob_dir)"
            ),
        ),
        (
            "context",
            ", ".join(f"{k}={v}" for k, v in description["context"].items()) or "none",
        ),
    ]
    if description["check"] is not None:
        shown.append(("check", _check_row(blob, description["check"], name)))
    return shown


def _name_row(blob: Blob, prefix: str) -> str:
    if blob.mode == MODE_LEGACY:
        return "not bound (legacy blob)"
    if blob.name is None:
        return (
            f"bound: decrypts only when requested as {prefix}:NAME for the name it was "
            "encrypted for (a version-1 blob does not record it)"
        )
    return f"{blob.name}: decrypts only when requested as {prefix}:{blob.name}"


def _user_row(blob: Blob) -> str:
    if not blob.binds_user:
        return "not bound (machine scope)"
    if blob.user is None:
        return (
            "bound: decrypts only for the host user it was encrypted for (a version-1 blob "
            "does not record it)"
        )
    return f"{blob.user}: decrypts only for the host user {blob.user}"


def _unit_row(blob: Blob) -> str:
    if not blob.binds_unit:
        return "not bound (any program the resolver's policy admits)"
    if blob.unit is None:
        return (
            "bound: decrypts only for a requester in the systemd unit it was encrypted for (a "
            "version-1 blob does not record it)"
        )
    return (
        f"{blob.unit}: decrypts only for a requester the resolver finds in {blob.unit} "
        "(from its cgroup)"
    )


def _check_row(blob: Blob, checked: str, name: str | None) -> str:
    if checked == UNBOUND:
        return "nothing to check: a legacy blob is bound to no name or user"
    if checked == UNRECORDED:
        return (
            "not checked locally: a version-1 blob does not record what it was made for (KMS "
            "still refuses another name, user or unit; re-encrypt to record them)"
        )
    made_for = [f"name {blob.name}"] if name is not None else []
    if blob.user is not None:
        made_for.append(f"user {blob.user}")
    if blob.unit is not None:
        made_for.append(f"unit {blob.unit}")
    return "ok: made for " + (", ".join(made_for) or "any user")
