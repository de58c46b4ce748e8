"""The build side of token blobs: `kmskeys encrypt --to pkcs11:...` (docs/blob-format.md).

Encrypting needs only the token key's public half, so a build host needs no PIN and no token:
`--to pkcs11:token=LABEL;object=KEY?module-path=/path/to/module.so` reads the public key from a
token present on this machine (RFC 7512 URI attributes `token`, `object`, `module-path`), and
`--to FILE.pem` takes it from a PEM SubjectPublicKeyInfo exported once from the token (what a
CI runner without the token uses). The blob records the key's id (SHA-256 of its public key), so
the host refuses a blob for any other key before touching the token.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote

from encryptor.errors import InputError
from kmskeys.tokenblob import TokenBlob, seal_blob

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
