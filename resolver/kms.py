"""KMS Decrypt of a `kms:` blob, bound to the request: the gateway operation and its use.

The request supplies what KMS binds the blob to (name, user, unit); the blob supplies its ciphertext
and key. The allowlist (resolver/policy.py check_key) is this operation's `authorize`, so the
gateway applies it once, before the host cache or KMS is asked, in the handler or in the
resolver daemon alike.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kmskeys.blob import MODE_ENVELOPE, Blob, BlobFormatError
from kmskeys.envelope import EnvelopeError, open_sealed
from resolver.backend import Budget, Request, Timings
from resolver.errors import RefusedError, ServiceUnavailableError
from resolver.gateway import Authorized, Gateway, Target
from resolver.policy import check_key

if TYPE_CHECKING:
    from resolver.config import Config


class BlobDecrypt:
    """The KMS Decrypt of one blob for one request (an Operation[bytes] of the gateway)."""

    service = "kms"
    label = "KMS"
    method = "decrypt"
    phase = "decrypt"

    def __init__(self, blob: Blob, request: Request) -> None:
        self.blob = blob
        try:
            # The values KMS binds the blob to: from the request, never from the blob.
            self.context = blob.encryption_context(request.name, request.user, request.unit)
        except BlobFormatError as exc:
            raise RefusedError(exc.reason) from None

    def authorize(self, config: Config) -> Target:
        """Only configured keys, only configured regions: the blob never chooses."""
        key_id, region = check_key(config, self.blob)
        return Target(key_id, region)

    def plan(self, config: Config, target: Target) -> tuple[list[Target], str]:
        """The blob's region, then a multi-Region key's replicas in the other regions."""
        pairs, why = region_plan(config, target.resource, target.region)
        return [Target(key, region) for key, region in pairs], why

    def params(self, target: Target) -> dict[str, Any]:
        """KeyId pins the key: KMS refuses a ciphertext that a different key produced."""
        params: dict[str, Any] = {"CiphertextBlob": self.blob.ciphertext, "KeyId": target.resource}
        if self.context:
            params["EncryptionContext"] = self.context
        return params

    def answer(self, target: Target, response: dict[str, Any]) -> bytes:
        """The plaintext, from an answer that names the key asked for."""
        # botocore turns an unparseable 200 body into an empty dict and lenient base64 into
        # b"": neither may become a key. KMS never returns an empty plaintext.
        key_id = response.get("KeyId")
        plaintext = response.get("Plaintext")
        if not isinstance(key_id, str) or not isinstance(plaintext, bytes) or not plaintext:
            raise ServiceUnavailableError("KMS answered with a malformed Decrypt response")
        if key_id != target.resource:
            raise RefusedError("KMS answered with a different KeyId than the blob names")
        return plaintext

    def invalid_request(self) -> str:
        """botocore refused the parameters."""
        return "blob does not make a valid KMS request"


def open_blob(
    gateway: Gateway,
    authorized: Authorized[bytes],
    budget: Budget,
    deadline: float,
    timings: Timings,
) -> bytes:
    """The plaintext of an authorized BlobDecrypt: KMS Decrypt, then an envelope's seal."""
    plaintext = gateway.call(authorized, budget, deadline, timings)
    op = authorized.operation
    assert isinstance(op, BlobDecrypt)
    if op.blob.mode != MODE_ENVELOPE:
        return plaintext
    start = time.perf_counter()
    try:
        return open_sealed(op.blob, op.context, plaintext)
    except EnvelopeError as exc:
        raise RefusedError(str(exc)) from None
    finally:
        timings.add("open", (time.perf_counter() - start) * 1000)


def is_multi_region(key_arn: str) -> bool:
    """True for a multi-Region key (key id `mrk-...`): its replicas share its key material."""
    return key_arn.rpartition("/")[2].startswith("mrk-")


def in_region(key_arn: str, region: str) -> str:
    """The ARN of a multi-Region key's replica in `region` (same partition, account and id)."""
    parts = key_arn.split(":")
    parts[3] = region
    return ":".join(parts)


def region_plan(config: Config, key_arn: str, region: str) -> tuple[list[tuple[str, str]], str]:
    """The (KeyId, region) pairs to try in order, and why there is no fallback ("" if there is).

    The blob's own region first, then the other configured regions, only for a multi-Region
    key: a single-Region key exists in one region, and only configured regions are ever used.
    """
    others = [r for r in config.regions if r != region]
    if not others:
        return [(key_arn, region)], ""
    if not is_multi_region(key_arn):
        # Short: the log line keeps 160 characters of a reason.
        return [(key_arn, region)], "no region fallback: a single-Region key (not mrk-)"
    return [(key_arn, region)] + [(in_region(key_arn, r), r) for r in others], ""
