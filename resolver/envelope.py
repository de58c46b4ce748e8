"""Envelope mode: a KMS-decrypted AES-256 data key opens the AES-GCM sealed secret."""

from __future__ import annotations

from collections.abc import Mapping

from kmskeys.blob import Blob, envelope_aad
from resolver.errors import RefusedError

DATA_KEY_BYTES = 32


def open_sealed(blob: Blob, data_key: bytes, context: Mapping[str, str]) -> bytes:
    """Open `blob.sealed` with `data_key`, authenticating the request's context as AAD."""
    # cryptography is imported here only: direct-mode requests never pay for it.
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(data_key) != DATA_KEY_BYTES or blob.nonce is None or blob.sealed is None:
        raise RefusedError("envelope blob: data key or sealed part has the wrong shape")
    try:
        return AESGCM(data_key).decrypt(blob.nonce, blob.sealed, envelope_aad(blob, context))
    except InvalidTag:
        raise RefusedError("envelope blob: sealed part does not authenticate") from None
