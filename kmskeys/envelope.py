"""Envelope mode: a KMS data key seals the secret with AES-256-GCM (docs/blob-format.md).

The one implementation of both directions: the encryptor seals, the resolver opens. The AAD is
`kmskeys.blob.envelope_aad`: the blob's header plus the request's encryption context, so a seal
opens only for the name (and user) the data key was generated for. `cryptography` is imported
inside the functions: the client's `import kmskeys` never loads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from kmskeys.blob import MODE_ENVELOPE, NONCE_BYTES, TAG_BYTES, VERSION, Blob, envelope_aad
from kmskeys.errors import KmsKeysError

DATA_KEY_BYTES = 32  # AES-256


class EnvelopeError(KmsKeysError, ValueError):
    """An envelope blob does not open: wrong data key, context or a tampered seal; re-encrypt."""


def seal(
    *,
    key_arn: str,
    name: str,
    user: str | None,
    unit: str | None = None,
    metadata: Mapping[str, str],
    wrapped_key: bytes,
    data_key: bytes,
    context: Mapping[str, str],
    plaintext: bytes,
) -> Blob:
    """An envelope blob for `name` (bound to `user` and `unit`, if given): `plaintext` under
    AES-256-GCM with `data_key`, AAD from envelope_aad."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(data_key) != DATA_KEY_BYTES:
        raise EnvelopeError(f"an AES-256 data key is {DATA_KEY_BYTES} bytes")
    # A random 96-bit nonce is safe here: each data key seals exactly one message.
    nonce = os.urandom(NONCE_BYTES)
    # The AAD covers the header and the context, never the nonce or the sealed part, so the
    # resolver computes it from the parsed blob; the placeholder is replaced below.
    draft = Blob(
        version=VERSION,
        mode=MODE_ENVELOPE,
        key_arn=key_arn,
        binds_user=user is not None,
        metadata=metadata,
        ciphertext=wrapped_key,
        nonce=nonce,
        sealed=bytes(TAG_BYTES + 1),
        name=name,
        user=user,
        binds_unit=unit is not None,
        unit=unit,
    )
    sealed = AESGCM(data_key).encrypt(nonce, plaintext, envelope_aad(draft, context))
    return replace(draft, sealed=sealed)


def open_sealed(blob: Blob, context: Mapping[str, str], data_key: bytes) -> bytes:
    """The plaintext of an envelope blob opened under `context` with its unwrapped data key."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(data_key) != DATA_KEY_BYTES or blob.nonce is None or blob.sealed is None:
        raise EnvelopeError("envelope blob: data key or sealed part has the wrong shape")
    try:
        return AESGCM(data_key).decrypt(blob.nonce, blob.sealed, envelope_aad(blob, context))
    except InvalidTag:
        raise EnvelopeError("envelope blob: sealed part does not authenticate") from None
