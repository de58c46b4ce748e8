"""Envelope mode: a KMS data key wraps the secret with AES-256-GCM (docs/blob-format.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from kmskeys.blob import MODE_ENVELOPE, NONCE_BYTES, TAG_BYTES, VERSION, Blob, envelope_aad

DATA_KEY_BYTES = 32  # AES-256


def seal(
    *,
    key_arn: str,
    binds_user: bool,
    metadata: Mapping[str, str],
    wrapped_key: bytes,
    data_key: bytes,
    context: Mapping[str, str],
    plaintext: bytes,
) -> Blob:
    """An envelope blob: `plaintext` under AES-256-GCM with `data_key`, AAD from envelope_aad."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(data_key) != DATA_KEY_BYTES:
        raise ValueError(f"an AES-256 data key is {DATA_KEY_BYTES} bytes")
    # A random 96-bit nonce is safe here: each data key seals exactly one message.
    nonce = os.urandom(NONCE_BYTES)
    # The AAD covers the header and the context, never the nonce or the sealed part, so the
    # resolver computes it from the parsed blob; the placeholder is replaced below.
    draft = Blob(
        version=VERSION,
        mode=MODE_ENVELOPE,
        key_arn=key_arn,
        binds_user=binds_user,
        metadata=metadata,
        ciphertext=wrapped_key,
        nonce=nonce,
        sealed=bytes(TAG_BYTES + 1),
    )
    sealed = AESGCM(data_key).encrypt(nonce, plaintext, envelope_aad(draft, context))
    return replace(draft, sealed=sealed)


def open_sealed(blob: Blob, context: Mapping[str, str], data_key: bytes) -> bytes:
    """The plaintext of an envelope blob, given its unwrapped data key (tests and tooling)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if blob.nonce is None or blob.sealed is None:
        raise ValueError("not an envelope blob")
    return AESGCM(data_key).decrypt(blob.nonce, blob.sealed, envelope_aad(blob, context))
