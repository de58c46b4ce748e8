"""kmskeys build side: turn secrets into KMS blobs bound to their name (and user).

import encryptor
blob = encryptor.encrypt(b"s3cret", "db-password", "alias/app-secrets", user="www-data")
Path("db-password.kms").write_text(blob.to_text() + "\\n")
"""

from __future__ import annotations

from encryptor.bundle import bundle, parse_envfile
from encryptor.encryption import encrypt, encrypt_raw
from encryptor.errors import (
    AccessDeniedError,
    EncryptorError,
    EndpointUnreachableError,
    InputError,
    KeyUnavailableError,
    KmsError,
    KmsUnavailableError,
    NoCredentialsError,
    NoRegionError,
    OutputError,
    ThrottledError,
    UsageError,
)

__all__ = [
    "AccessDeniedError",
    "EncryptorError",
    "EndpointUnreachableError",
    "InputError",
    "KeyUnavailableError",
    "KmsError",
    "KmsUnavailableError",
    "NoCredentialsError",
    "NoRegionError",
    "OutputError",
    "ThrottledError",
    "UsageError",
    "bundle",
    "encrypt",
    "encrypt_raw",
    "parse_envfile",
]
