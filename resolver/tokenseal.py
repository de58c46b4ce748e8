"""`seal = "pkcs11"`: keystore entries wrapped by a key that never leaves the host's token.

Next to `seal = "kms"` (resolver/seal.py): the same entries, the same seal context as
associated data (`kmskeys_seal`, `kmskeys_host`, `kmskeys_scope`, `kmskeys_name`), but the key
that wraps each entry's data key is an RSA key on a PKCS#11 token (a YubiKey's PIV slot, a
smart card, an HSM). A copied disk or a stolen keystore file then decrypts nothing without the
token and its PIN. Sealing needs only the public key (no PIN); unsealing is one private
operation through the token's gateway (`pkcs11seal.token_call`: the requester's budget, the
time, the one classification).

The entry's material is `TokenEnvelope.to_bytes()`; its seal-key field records the token key
as `pkcs11:KEY_ID` (hex), so an entry sealed under another token key is refused without asking
the token. `kmskeys_host` is `seal_host` when set, else `token`: the token is the host's
identity here, and its key id is bound through the associated data already.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resolver.errors import CorruptEntryError, KeystoreError
from resolver.keystore import Entry, EntryId
from resolver.seal import seal_context

if TYPE_CHECKING:
    from resolver.backend import Budget, Timings
    from resolver.config import Config

KEY_REF_PREFIX = "pkcs11:"
DEFAULT_HOST = "token"


class TokenSeal:
    """Wraps and unwraps keystore keys with the configured token key."""

    def __init__(self, config: Config, budget: Budget, deadline: float, timings: Timings) -> None:
        from resolver.pkcs11seal import settings_from

        self.settings = settings_from(config)
        self.host = config.seal_host or DEFAULT_HOST
        self.budget, self.deadline, self.timings = budget, deadline, timings

    def seal(self, eid: EntryId, key: bytes) -> tuple[bytes, str]:
        """(the entry's material, its key reference): `key` sealed under the token's public key,
        bound to this host and `eid`'s scope and name."""
        import time

        from kmskeys.tokenblob import key_id, seal_entry
        from resolver.pkcs11seal import TokenRefusedError, public_key

        self.budget.spend()
        start = time.perf_counter()
        try:
            spki = public_key(self.settings)
        finally:
            self.timings.add("seal", (time.perf_counter() - start) * 1000)
        found = key_id(spki)
        if self.settings.key_id is not None and found != self.settings.key_id:
            raise TokenRefusedError(
                f"the key {self.settings.key_label!r} on token {self.settings.token_label!r} is "
                "not the configured one (token_key_id differs): was the token replaced?"
            )
        envelope = seal_entry(spki, key, seal_context(self.host, eid))
        return envelope.to_bytes(), KEY_REF_PREFIX + found.hex()

    def unseal(self, entry: Entry) -> bytes:
        """The key inside an entry sealed by the token."""
        from kmskeys.blob import BlobFormatError
        from kmskeys.tokenblob import TokenEnvelope
        from resolver.pkcs11seal import TokenSession, token_call

        try:
            envelope = TokenEnvelope.from_bytes(entry.material)
        except BlobFormatError as exc:
            raise CorruptEntryError(
                f"keystore entry {entry.id}: its token envelope is damaged ({exc.reason}); "
                "restore it from a backup"
            ) from None
        if entry.seal_key_arn != KEY_REF_PREFIX + envelope.key_id.hex():
            raise CorruptEntryError(f"keystore entry {entry.id}: its key reference is damaged")
        if self.settings.key_id is not None and envelope.key_id != self.settings.key_id:
            raise KeystoreError(
                f"keystore entry {entry.id} is sealed under token key "
                f"{envelope.key_id.hex()[:16]}..., not the configured token_key_id"
            )
        context = seal_context(self.host, entry.id)

        def opened(token: TokenSession) -> bytes:
            return token.open_entry(envelope, context)

        key = token_call(self.settings, self.budget, self.timings, opened, phase="unseal")
        if len(key) != entry.key_size:
            raise CorruptEntryError(f"keystore entry {entry.id}: the unsealed key has another size")
        return key
