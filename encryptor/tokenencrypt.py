"""The build side of token blobs: `kmskeys encrypt --to pkcs11:...` (docs/blob-format.md).

Encrypting needs only the token key's public half, so a build host needs no PIN and no token:
`--to pkcs11:token=LABEL;object=KEY?module-path=/path/to/module.so` reads the public key from a
token present on this machine (RFC 7512 URI attributes `token`, `object`, `module-path`), and
`--to FILE.pem` takes it from a PEM SubjectPublicKeyInfo exported once from the token (what a
CI runner without the token uses). The blob records the key's id (SHA-256 of its public key), so
the host refuses a blob for any other key before touching the token; and the name (and user) it
was made for, so that `kmskeys inspect NAME FILE` and the host refuse a misnamed one locally.

The commands' token halves live here too: `encrypt --to` (`encrypt_command`) and `inspect` of a
token blob (`inspect_command`); encryptor/cli.py dispatches to them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from encryptor.errors import EXIT_OK, InputError, UsageError
from kmskeys.blobfields import CONTEXT_NOT_AFTER, BlobFormatError, check_user_name, parse_not_after
from kmskeys.contract import DEFAULT_PREFIX, DEFAULT_TOKEN_PREFIX, USER_PAYLOAD_MAX
from kmskeys.tokenblob import ALGORITHMS, BLOB_SUFFIX, TokenBlob, parse_token_blob, seal_blob

URI_SCHEME = "pkcs11:"


class TokenTarget:
    """Where the token key's public half comes from: a parsed `pkcs11:` URI."""

    __slots__ = ("module", "object", "token")

    def __init__(self, token: str, object_label: str, module: str) -> None:
        self.token, self.object, self.module = token, object_label, module


def parse_pkcs11_uri(uri: str) -> TokenTarget:
    """The token label, key label and module of `pkcs11:token=..;object=..?module-path=..`."""
    if not uri.startswith(URI_SCHEME):
        raise InputError(f"a token target starts with {URI_SCHEME!r}")
    path, _, query = uri[len(URI_SCHEME) :].partition("?")
    attributes: dict[str, str] = {}
    for part in [p for p in path.split(";") if p] + [q for q in query.split("&") if q]:
        key, sep, value = part.partition("=")
        if not sep or key in attributes:
            raise InputError(f"pkcs11 URI attribute {key!r} is malformed or repeated")
        attributes[key] = unquote(value)
    unknown = set(attributes) - {"token", "object", "module-path", "type"}
    if unknown:
        raise InputError(f"pkcs11 URI attributes {sorted(unknown)} are not supported")
    if attributes.get("type", "public") not in ("public", "private"):
        raise InputError("pkcs11 URI type must name the key pair (public or private)")
    missing = [k for k in ("token", "object", "module-path") if not attributes.get(k)]
    if missing:
        raise InputError(f"pkcs11 URI lacks {', '.join(missing)}")
    return TokenTarget(attributes["token"], attributes["object"], attributes["module-path"])


def public_key_spki(target: str) -> bytes:
    """The SubjectPublicKeyInfo (DER) of `--to`: a `pkcs11:` URI or a PEM file."""
    from cryptography.hazmat.primitives import serialization

    if target.startswith(URI_SCHEME):
        return _from_token(parse_pkcs11_uri(target))
    try:
        key = serialization.load_pem_public_key(Path(target).read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"--to {target}: not a readable PEM public key ({exc})") from None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _from_token(target: TokenTarget) -> bytes:
    try:
        import pkcs11
        from pkcs11 import Attribute, KeyType, ObjectClass
    except ImportError:
        raise InputError(
            "reading a token needs python-pkcs11 (pip install 'kmskeys[token]')"
        ) from None
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    try:
        token = pkcs11.lib(target.module).get_token(token_label=target.token)
        with token.open() as session:
            public = session.get_key(
                object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.RSA, label=target.object
            )
            modulus, exponent = public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT]
    except Exception as exc:
        raise InputError(
            f"cannot read the public key {target.object!r} of token {target.token!r}: "
            f"{type(exc).__name__}"
        ) from None
    numbers = RSAPublicNumbers(int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big"))
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def encrypt_to_token(
    plaintext: bytes,
    name: str,
    spki_der: bytes,
    *,
    user: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> TokenBlob:
    """A `kmsp1:` blob of `plaintext` bound to `name` (and `user`); `.to_text()` to deploy it."""
    from encryptor.encryption import check_plaintext, check_user
    from kmskeys.blob import BlobFormatError

    check_plaintext(plaintext)
    if user is not None:
        check_user(user)
    try:
        return seal_blob(spki_der, plaintext, name, user=user, metadata=metadata)
    except BlobFormatError as exc:
        raise InputError(exc.reason) from None


# --- the commands' token halves (encryptor/cli.py) --------------------------------------------


def encrypt_command(
    args: argparse.Namespace, emit: Callable[[argparse.Namespace, str], int]
) -> int:
    """`kmskeys encrypt NAME --to TARGET`: a token blob of stdin (or --input), then `emit`."""
    from encryptor.encryption import TOO_BIG, build_metadata, parse_context_option
    from encryptor.files import read_bounded
    from kmskeys.names import validate_name

    if args.raw or args.envelope:
        raise UsageError("--to makes a token blob: --raw and --envelope are KMS blobs' options")
    validate_name(args.name)
    metadata = build_metadata(not_after=args.not_after, context=parse_context_option(args.context))
    spki = public_key_spki(args.to)
    if args.input == "-" and sys.stdin.isatty():
        print("reading the secret from stdin; end it with Ctrl-D", file=sys.stderr)
    plaintext = read_bounded(args.input, USER_PAYLOAD_MAX, "the secret", TOO_BIG)
    blob = encrypt_to_token(plaintext, args.name, spki, user=args.user, metadata=metadata)
    del plaintext
    print(
        f"note: deploy this as BLOB_DIR/{args.name}{BLOB_SUFFIX} on the host (token blobs are "
        f"never passed inline); apps request {DEFAULT_TOKEN_PREFIX}:{args.name}",
        file=sys.stderr,
    )
    return emit(args, blob.to_text())


def inspect_command(
    args: argparse.Namespace, text: str | bytes, name: str | None, prefix: str
) -> int:
    """`kmskeys inspect [NAME] BLOB` of a token blob: what it says, checked against NAME/--user."""
    try:
        blob = parse_token_blob(text)
    except BlobFormatError as exc:
        raise InputError(exc.reason) from None
    if args.user is not None:
        try:
            check_user_name(args.user)
        except BlobFormatError as exc:
            raise InputError(f"--user: {exc.reason}") from None
    checked = None
    if name is not None or args.user is not None:
        blob.check_request(name, args.user)  # BlobMismatchError: exit 3, as for kms blobs
        checked = "match"
    shown = DEFAULT_TOKEN_PREFIX if prefix == DEFAULT_PREFIX else prefix
    description = describe_token(blob, checked)
    if args.json:
        print(json.dumps(description, indent=2, sort_keys=True))
        return EXIT_OK
    for label, value in token_rows(blob, description, shown, name, args.user):
        print(f"{label:<10} {value}")
    return EXIT_OK


def describe_token(blob: TokenBlob, checked: str | None) -> dict[str, Any]:
    """What `inspect --json` prints for a token blob."""
    text = blob.to_text()
    not_after = blob.metadata.get(CONTEXT_NOT_AFTER)
    expiry = None if not_after is None else parse_not_after(not_after)
    return {
        "kind": "token",
        "version": int(text.split(":", 1)[0].removeprefix("kmsp")),
        "algorithm": ALGORITHMS[blob.envelope.alg],
        "name": blob.name,
        "user": blob.user,
        "binds_user": blob.binds_user,
        "key_id": blob.envelope.key_id.hex(),
        "not_after": not_after,
        "expired": expiry is not None and expiry <= datetime.now(UTC),
        "size": len(text),
        "context": {k: v for k, v in blob.metadata.items() if k != CONTEXT_NOT_AFTER},
        "check": checked,
    }


def token_rows(
    blob: TokenBlob, described: dict[str, Any], prefix: str, name: str | None, user: str | None
) -> list[tuple[str, str]]:
    """(label, text) lines of a token blob's human-readable description."""
    user_row = (
        f"{blob.user}: opens only for the host user {blob.user}"
        if blob.user is not None
        else "not bound (machine scope)"
    )
    not_after = described["not_after"] or "none"
    rows = [
        ("version", f"{described['version']} (token blob)"),
        ("algorithm", described["algorithm"]),
        ("name", f"{blob.name}: opens only when requested as {prefix}:{blob.name}"),
        ("user", user_row),
        ("not_after", not_after + (" (expired)" if described["expired"] else "")),
        ("key_id", f"{described['key_id']} (the token key; the host's token_key_id pins it)"),
        ("size", f"{described['size']} characters (deploy as BLOB_DIR/{blob.name}{BLOB_SUFFIX})"),
        ("context", ", ".join(f"{k}={v}" for k, v in described["context"].items()) or "none"),
    ]
    if described["check"] is not None:
        made_for = [f"name {blob.name}"] if name is not None else []
        if user is not None and blob.user is not None:
            made_for.append(f"user {blob.user}")
        rows.append(("check", "ok: made for " + (", ".join(made_for) or "any user")))
    return rows
