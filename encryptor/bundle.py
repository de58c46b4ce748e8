"""`kmskeys bundle`: every KEY=VALUE of an env file becomes DIR/KEY.kms, all or nothing.

The env file follows the usual `.env` conventions: blank lines and `#` comments are skipped, an
`export ` prefix is allowed, values may be bare (a ` #` starts a comment), single-quoted (literal)
or double-quoted (with \\n \\r \\t \\" \\\\ \\$ escapes). Values are never expanded or printed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from encryptor.encryption import build_metadata, check_key_id, check_unit, check_user, encrypt
from encryptor.errors import InputError
from encryptor.expiry import parse_when
from encryptor.files import write_atomic
from kmskeys.blob import Blob
from kmskeys.contract import USER_PAYLOAD_MAX
from kmskeys.errors import InvalidNameError
from kmskeys.names import validate_name

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

MAX_ENVFILE = 16 * 1024 * 1024
BLOB_SUFFIX = ".kms"
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "$": "$"}


@dataclass(frozen=True)
class Entry:
    """One secret from an env file; the value never shows in repr."""

    name: str
    line: int
    value: bytes = field(repr=False)


@dataclass(frozen=True)
class Bundled:
    """What `bundle` wrote for one secret: everything but the value."""

    name: str
    size: int
    path: Path
    blob: Blob

    @property
    def mode(self) -> str:
        """direct or envelope."""
        return self.blob.mode

    @property
    def key_arn(self) -> str:
        """The key ARN KMS reported."""
        return self.blob.key_arn or ""


def parse_envfile(data: bytes) -> list[Entry]:
    """The entries of an env file, or InputError naming the first bad line (never its value)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"line {bad_line}: not valid UTF-8") from None
    text = text.removeprefix("\ufeff")
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        stripped = raw.removesuffix("\r").strip()
        if not stripped or stripped.startswith("#"):
            continue
        entry = _parse_line(stripped, number)
        if entry.name in seen:
            raise InputError(
                f"line {number}: {entry.name} is already defined on line {seen[entry.name]}"
            )
        seen[entry.name] = number
        entries.append(entry)
    if not entries:
        raise InputError("the env file holds no KEY=VALUE lines")
    return entries


def _parse_line(line: str, number: int) -> Entry:
    if line.startswith("export") and line[6:7].isspace():
        line = line[6:].lstrip()
    key, sep, rest = line.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"line {number}: expected KEY=VALUE")
    try:
        name = validate_name(key)
    except InvalidNameError as exc:
        raise InputError(f"line {number}: {exc}") from None
    value = _parse_value(rest.strip(), number)
    if not value:
        raise InputError(f"line {number}: {name} has an empty value")
    encoded = value.encode("utf-8")
    if len(encoded) > USER_PAYLOAD_MAX:
        raise InputError(
            f"line {number}: {name} is over {USER_PAYLOAD_MAX} bytes, more than a `user` key holds"
        )
    return Entry(name=name, line=number, value=encoded)


def _parse_value(rest: str, number: int) -> str:
    if rest[:1] == "'":
        end = rest.find("'", 1)
        if end < 0:
            raise InputError(f"line {number}: unterminated single quote")
        _expect_end(rest[end + 1 :], number)
        return rest[1:end]
    if rest[:1] == '"':
        chars: list[str] = []
        i = 1
        while i < len(rest):
            char = rest[i]
            if char == "\\" and i + 1 < len(rest):
                nxt = rest[i + 1]
                chars.append(_ESCAPES.get(nxt, "\\" + nxt))
                i += 2
                continue
            if char == '"':
                _expect_end(rest[i + 1 :], number)
                return "".join(chars)
            chars.append(char)
            i += 1
        raise InputError(f"line {number}: unterminated double quote")
    # Bare value: a '#' after whitespace starts a comment, as in shell.
    for i, char in enumerate(rest):
        if char == "#" and i > 0 and rest[i - 1].isspace():
            return rest[:i].rstrip()
    return rest


def _expect_end(tail: str, number: int) -> None:
    tail = tail.strip()
    if tail and not tail.startswith("#"):
        raise InputError(f"line {number}: unexpected text after the closing quote")


def bundle(
    envfile: bytes,
    key_id: str,
    output_dir: Path,
    *,
    user: str | None = None,
    unit: str | None = None,
    not_after: datetime | str | None = None,
    context: Mapping[str, str] | None = None,
    client: KMSClient | None = None,
    region: str | None = None,
    profile: str | None = None,
    endpoint_url: str | None = None,
) -> list[Bundled]:
    """Encrypt every entry of `envfile` (its bytes) and write `output_dir/NAME.kms` atomically.

    Nothing is written unless every line parses and every secret encrypts.
    """
    entries = parse_envfile(envfile)
    key_id = check_key_id(key_id)
    if user is not None:
        check_user(user)
    if unit is not None:
        check_unit(unit)
    # Resolve a relative expiry once, so every blob of the bundle carries the same instant.
    when = parse_when(not_after) if isinstance(not_after, str) else not_after
    build_metadata(not_after=when, context=context)  # fail on bad options before any KMS call
    from encryptor.kms import make_client

    client = client or make_client(region=region, profile=profile, endpoint_url=endpoint_url)
    results = [
        Bundled(
            name=entry.name,
            size=len(entry.value),
            path=output_dir / f"{entry.name}{BLOB_SUFFIX}",
            blob=encrypt(
                entry.value,
                entry.name,
                key_id,
                user=user,
                unit=unit,
                not_after=when,
                context=context,
                client=client,
            ),
        )
        for entry in entries
    ]
    for result in results:
        write_atomic(result.path, (result.blob.to_text() + "\n").encode("ascii"))
    return results
