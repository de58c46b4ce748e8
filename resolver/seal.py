"""`seal = "kms"`: keystore entries kept as KMS ciphertext, bound to this host, scope and name.

A copied disk then yields no key without this instance's role: the Terraform seal statement lets
a host Encrypt/Decrypt under the seal key only with its own instance ARN as `kmskeys_host`
(`ec2:SourceInstanceARN`). The key itself is made here (os.urandom) and KMS wraps it; the
encryption context is the contract with terraform/ and must not change:

    {"kmskeys_seal": "stored", "kmskeys_host": seal_host,
     "kmskeys_scope": "user:UID" | "machine", "kmskeys_name": NAME}

One KMS call per miss and no retries inside the request: a transient failure is EAGAIN, which the
kernel never caches, so the next request tries again. botocore is imported only here, lazily.
"""

from __future__ import annotations

import time

from kmskeys.stored import SCOPE_USER
from resolver.backend import Timings
from resolver.config import Config
from resolver.errors import ConfigError, KeystoreError, RefusedError, UnavailableError
from resolver.keystore import Entry, EntryId
from resolver.kms import classify, kms_client


def seal_context(host: str, eid: EntryId) -> dict[str, str]:
    """The encryption context that binds a sealed entry (the version is not part of it)."""
    scope = f"user:{eid.uid}" if eid.scope == SCOPE_USER else "machine"
    return {
        "kmskeys_seal": "stored",
        "kmskeys_host": host,
        "kmskeys_scope": scope,
        "kmskeys_name": eid.name,
    }


class KmsSeal:
    """Wraps and unwraps keystore keys with the config's seal key."""

    def __init__(self, config: Config, deadline: float, timings: Timings) -> None:
        if config.seal_key_arn is None or config.seal_host is None:
            raise ConfigError("a KMS-sealed entry needs seal_key_arn and seal_host in the config")
        self.arn = config.seal_key_arn
        self.host = config.seal_host
        # seal_key_arn is a full key ARN (checked by the config): its region is the client's.
        region = self.arn.split(":")[3]
        self.client = kms_client(config, region, deadline, timings)
        self.timings = timings

    def seal(self, eid: EntryId, key: bytes) -> bytes:
        """The KMS ciphertext of `key`, bound to this host and `eid`'s scope and name."""
        start = time.perf_counter()
        try:
            answer = self.client.encrypt(
                KeyId=self.arn, Plaintext=key, EncryptionContext=seal_context(self.host, eid)
            )
        except Exception as exc:
            raise classify(exc) from None
        finally:
            self.timings.add("seal", (time.perf_counter() - start) * 1000)
        blob = answer.get("CiphertextBlob")
        if answer.get("KeyId") != self.arn:
            raise RefusedError("KMS sealed with a different KeyId than seal_key_arn")
        if not isinstance(blob, bytes) or not blob:
            raise UnavailableError("KMS answered with a malformed Encrypt response")
        return blob

    def unseal(self, entry: Entry) -> bytes:
        """The key inside a sealed entry."""
        if entry.seal_key_arn != self.arn:
            raise KeystoreError(
                f"keystore entry {entry.id} is sealed under {entry.seal_key_arn}, not the "
                "configured seal_key_arn; set seal_key_arn back to that key"
            )
        start = time.perf_counter()
        try:
            answer = self.client.decrypt(
                CiphertextBlob=entry.material,
                KeyId=self.arn,
                EncryptionContext=seal_context(self.host, entry.id),
            )
        except Exception as exc:
            raise classify(exc) from None
        finally:
            self.timings.add("unseal", (time.perf_counter() - start) * 1000)
        key = answer.get("Plaintext")
        if answer.get("KeyId") != self.arn:
            raise RefusedError("KMS unsealed with a different KeyId than seal_key_arn")
        if not isinstance(key, bytes) or len(key) != entry.key_size:
            raise UnavailableError("KMS answered with a malformed Decrypt response")
        return key
