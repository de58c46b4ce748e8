"""The `stored:` backend's declaration: its settings, its grammar and its per-name policy.

Light on purpose: resolver/config.py composes this table on every miss, whatever the backend.
The backend itself is resolver/stored.py (and the keystore, resolver/keystore.py), imported only
for a `stored:` request (resolver/registry.py). docs/dpapi.md describes the keystore.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kmskeys import contract
from kmskeys.names import validate_name
from kmskeys.stored import split_qualifier
from resolver.backend import BackendSpec
from resolver.errors import ConfigError
from resolver.settings import policy, setting
from resolver.validators import NameRule, abs_path, choice, count, key_arn, prefix, text

DEFAULT_KEYSTORE_DIR = Path(contract.DEFAULT_KEYSTORE_DIR)
SEALS = ("none", "kms", "pkcs11")
MAX_ENTRIES_PER_UID = 1_000_000
MAX_BYTES_PER_UID = 1 << 30


@dataclass(frozen=True, init=False, repr=False, eq=False)
class StoredSettings:
    """`stored:NAME`: a random key per (scope, NAME), made once and kept in the keystore."""

    stored_prefix: str = setting(
        contract.DEFAULT_STORED_PREFIX,
        prefix,
        "description namespace of the keystore, `STORED_PREFIX:NAME[#SCOPE][#vN]`; must differ "
        "from every other prefix (docs/dpapi.md)",
    )
    keystore_dir: Path = setting(
        DEFAULT_KEYSTORE_DIR,
        abs_path,
        "the keystore: root-owned 0700, never created by a request (install creates it)",
    )
    seal: str = setting(
        "none",
        choice(SEALS),
        '`"kms"`: new keystore entries are KMS ciphertext bound to this host, scope and name; '
        "each seal or unseal is an AWS call of the requester's (`kms_rate_per_uid`). "
        '`"pkcs11"`: wrapped by the key on the host\'s token (`token_module`..., docs/tokens.md)',
        note='"kms": by seal_key_arn; "pkcs11": by the token key',
    )
    seal_key_arn: str | None = setting(
        None,
        key_arn,
        'the seal key\'s ARN; required with `seal = "kms"`',
        examples=('"arn:aws:kms:eu-west-1:111122223333:key/..."',),
    )
    seal_host: str | None = setting(
        None,
        text,
        "this instance's ARN (`arn:aws:ec2:REGION:ACCOUNT:instance/ID`), the `kmskeys_host` of "
        'the seal context; required with `seal = "kms"` (with `"pkcs11"`: optional, default '
        "`token`)",
        examples=('"arn:aws:ec2:eu-west-1:111122223333:instance/i-..."',),
    )
    keystore_entries_per_uid: int = setting(
        1000,
        count(1, MAX_ENTRIES_PER_UID),
        "keystore entries the requests of one uid may create (1 to 1000000): its user-scope "
        "keys and the machine-scope keys its request made first; the next new name is refused, "
        "nothing written (docs/dpapi.md)",
        note="new stored: keys one uid's requests may create",
    )
    keystore_bytes_per_uid: int = setting(
        1 << 20,
        count(4096, MAX_BYTES_PER_UID),
        "bytes of keystore entries the requests of one uid may create (4096 to 1 GiB; an entry "
        "is its key size plus about 100 bytes, plus the ciphertext overhead when sealed)",
        note="bytes of stored: entries one uid's requests may create",
    )
    stored: tuple[NameRule, ...] = policy(
        "per-name policy of `stored:` names (below)",
        "stored_prefix",
        ("ttl", "allow_users", "scope", "key_size"),
        '[stored."shared/*"]\nscope = "machine"\nkey_size = 32',
    )

    def check_stored(self, where: str) -> None:
        """Refuse a KMS seal without its key and host."""
        if self.seal == "kms" and (self.seal_key_arn is None or self.seal_host is None):
            raise ConfigError(
                f'{where}: seal = "kms" needs seal_key_arn (the seal key) and seal_host (this '
                "instance's ARN, arn:aws:ec2:REGION:ACCOUNT:instance/ID)"
            )


def split(rest: str) -> tuple[str, str]:
    """NAME and qualifier (`#machine#v2`, checked by the backend, kmskeys.stored) from what
    follows `PREFIX:` in a `stored:` description."""
    name, qualifier = split_qualifier(rest)
    return validate_name(name), qualifier


SPEC = BackendSpec("stored", StoredSettings, "stored_prefix", "stored", split)
