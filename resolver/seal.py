"""`seal = "kms"`: keystore entries kept as KMS ciphertext, bound to this host, scope and name.

A copied disk then yields no key without this instance's role: the Terraform seal statement lets
a host Encrypt/Decrypt under the seal key only with its own instance ARN as `kmskeys_host`
(`ec2:SourceInstanceARN`). The key itself is made here (os.urandom) and KMS wraps it; the
encryption context is the contract with terraform/ and must not change:

    {"kmskeys_seal": "stored", "kmskeys_host": seal_host,
     "kmskeys_scope": "user:UID" | "machine", "kmskeys_name": NAME}

Both calls are operations of the AWS gateway (resolver/gateway.py): the requester's budget,
deadline-aware retries and the one classification apply as to a blob's Decrypt. A failure is
EAGAIN or a refusal; the kernel never caches EAGAIN, so the next request tries again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmskeys.stored import SCOPE_USER
from resolver.backend import Budget, Timings
from resolver.errors import ConfigError, KeystoreError, RefusedError, ServiceUnavailableError
from resolver.gateway import Gateway, Target
from resolver.keystore import Entry, EntryId

if TYPE_CHECKING:
    from resolver.config import Config


def seal_context(host: str, eid: EntryId) -> dict[str, str]:
    """The encryption context that binds a sealed entry (the version is not part of it)."""
    scope = f"user:{eid.uid}" if eid.scope == SCOPE_USER else "machine"
    return {
        "kmskeys_seal": "stored",
        "kmskeys_host": host,
        "kmskeys_scope": scope,
        "kmskeys_name": eid.name,
    }


def _seal_target(config: Config) -> Target:
    """The allowlist of the seal: the one key the config names, in its own region only."""
    if config.seal_key_arn is None or config.seal_host is None:
        raise ConfigError("a KMS-sealed entry needs seal_key_arn and seal_host in the config")
    # seal_key_arn is a full key ARN (checked by the config): its region is the client's.
    return Target(config.seal_key_arn, config.seal_key_arn.split(":")[3])


class _SealCall:
    """What Encrypt and Decrypt under the seal key share (Operation attributes)."""

    service = "kms"
    label = "KMS"

    def __init__(self, host: str, eid: EntryId) -> None:
        self.context = seal_context(host, eid)

    def authorize(self, config: Config) -> Target:
        """The seal key of the config, nothing else."""
        return _seal_target(config)

    def plan(self, config: Config, target: Target) -> tuple[list[Target], str]:
        """The seal key's region: no fallback, the context binds this host's key."""
        return [target], ""

    def invalid_request(self) -> str:
        """botocore refused the parameters."""
        return "the keystore entry does not make a valid KMS request"


class SealEncrypt(_SealCall):
    """Encrypt a new entry's key under the seal key (an Operation[bytes])."""

    method = "encrypt"
    phase = "seal"

    def __init__(self, host: str, eid: EntryId, key: bytes) -> None:
        super().__init__(host, eid)
        self.key = key

    def __repr__(self) -> str:  # never the key
        return f"SealEncrypt({self.context['kmskeys_name']!r})"

    def params(self, target: Target) -> dict[str, Any]:
        """KeyId, the key and the context that binds it."""
        return {"KeyId": target.resource, "Plaintext": self.key, "EncryptionContext": self.context}

    def answer(self, target: Target, response: dict[str, Any]) -> bytes:
        """The ciphertext, from an answer under the seal key."""
        blob = response.get("CiphertextBlob")
        if response.get("KeyId") != target.resource:
            raise RefusedError("KMS sealed with a different KeyId than seal_key_arn")
        if not isinstance(blob, bytes) or not blob:
            raise ServiceUnavailableError("KMS answered with a malformed Encrypt response")
        return blob


class SealDecrypt(_SealCall):
    """Decrypt a sealed entry's key (an Operation[bytes])."""

    method = "decrypt"
    phase = "unseal"

    def __init__(self, host: str, entry: Entry) -> None:
        super().__init__(host, entry.id)
        self.entry = entry

    def authorize(self, config: Config) -> Target:
        """The seal key of the config, and the one the entry was sealed under."""
        target = _seal_target(config)
        if self.entry.seal_key_arn != target.resource:
            raise KeystoreError(
                f"keystore entry {self.entry.id} is sealed under {self.entry.seal_key_arn}, not "
                "the configured seal_key_arn; set seal_key_arn back to that key"
            )
        return target

    def params(self, target: Target) -> dict[str, Any]:
        """The entry's ciphertext, KeyId and context."""
        return {
            "CiphertextBlob": self.entry.material,
            "KeyId": target.resource,
            "EncryptionContext": self.context,
        }

    def answer(self, target: Target, response: dict[str, Any]) -> bytes:
        """The key, from an answer under the seal key, of the entry's size."""
        key = response.get("Plaintext")
        if response.get("KeyId") != target.resource:
            raise RefusedError("KMS unsealed with a different KeyId than seal_key_arn")
        if not isinstance(key, bytes) or len(key) != self.entry.key_size:
            raise ServiceUnavailableError("KMS answered with a malformed Decrypt response")
        return key


class KmsSeal:
    """Wraps and unwraps keystore keys with the config's seal key, through the gateway."""

    def __init__(self, config: Config, budget: Budget, deadline: float, timings: Timings) -> None:
        _seal_target(config)
        self.gateway = Gateway(config)
        self.host = config.seal_host or ""
        self.budget, self.deadline, self.timings = budget, deadline, timings

    def seal(self, eid: EntryId, key: bytes) -> bytes:
        """The KMS ciphertext of `key`, bound to this host and `eid`'s scope and name."""
        call = self.gateway.authorize(SealEncrypt(self.host, eid, key))
        return self.gateway.call(call, self.budget, self.deadline, self.timings)

    def unseal(self, entry: Entry) -> bytes:
        """The key inside a sealed entry."""
        call = self.gateway.authorize(SealDecrypt(self.host, entry))
        return self.gateway.call(call, self.budget, self.deadline, self.timings)
