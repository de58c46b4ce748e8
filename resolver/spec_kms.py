"""The `kms:` backend's declaration: its settings, its grammar and its per-name policy.

Light on purpose: resolver/config.py composes this table on every miss, whatever the backend.
The backend itself is resolver/blobs.py, imported only for a `kms:` request (resolver/registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kmskeys import contract
from kmskeys.names import validate_name
from resolver.backend import BackendSpec
from resolver.errors import ConfigError
from resolver.settings import PARTITIONS, policy, setting
from resolver.validators import NameRule, abs_path, accounts, boolean, choice, key_arns, prefix

DEFAULT_BLOB_DIR = Path(contract.DEFAULT_BLOB_DIR)


@dataclass(frozen=True, init=False, repr=False, eq=False)
class KmsSettings:
    """`kms:NAME`: a blob encrypted by the build side, decrypted by KMS on the first miss."""

    prefix: str = setting(
        contract.DEFAULT_PREFIX,
        prefix,
        "description namespace `PREFIX:NAME`; `[a-z][a-z0-9_-]{0,31}`",
        note="key descriptions are PREFIX:NAME",
    )
    # Strict mode (as in the AWS Encryption SDK): the only KMS keys the resolver will use, and
    # the regions it builds clients for. A blob naming another key is refused before any KMS
    # call. Discovery mode, only when asked for, accepts any key of the given accounts.
    key_arns: tuple[str, ...] = setting(
        (),
        key_arns,
        "strict mode: the only KMS key ARNs the resolver uses; a blob naming another key is "
        "refused before any KMS call. Aliases are not accepted",
        shown="none",
        examples=('["arn:aws:kms:…"]',),
        note="the only KMS keys the resolver uses (strict mode)",
    )
    discovery: bool = setting(
        False,
        boolean,
        "instead of `key_arns`: accept any key of `discovery_accounts`, in the configured regions",
        note="instead of key_arns: any key of discovery_accounts",
    )
    discovery_accounts: tuple[str, ...] = setting(
        (),
        accounts,
        "12-digit AWS account IDs; required with `discovery = true`",
        shown="none",
        note="12-digit AWS account IDs (discovery only)",
    )
    discovery_partition: str = setting(
        "aws",
        choice(PARTITIONS),
        "`aws`, `aws-cn` or `aws-us-gov` (discovery only)",
    )
    blob_dir: Path = setting(DEFAULT_BLOB_DIR, abs_path, "where `NAME.kms` files live")
    allow_legacy_blobs: bool = setting(
        False,
        boolean,
        "accept raw base64 KMS ciphertext with no context. Such a blob is bound to no name: "
        "only enable this for migration",
        note="raw base64 KMS ciphertext without a kmsk1: header",
    )
    names: tuple[NameRule, ...] = policy(
        "per-name policy of `kms:` names (below)",
        "prefix",
        ("ttl", "allow_users"),
        '[names."app/*"]\nttl = 60\nallow_users = ["www-data", 33]',
    )

    def check_kms(self, where: str) -> None:
        """Refuse a key allowlist that is neither strict nor discovery."""
        if self.discovery:
            if self.key_arns:
                raise ConfigError(f"{where}: set key_arns (strict mode) or discovery, not both")
            if not self.discovery_accounts:
                raise ConfigError(f"{where}: discovery needs discovery_accounts (AWS account IDs)")
        elif self.discovery_accounts:
            raise ConfigError(f"{where}: discovery_accounts is set but discovery is not true")


def split(rest: str) -> tuple[str, str]:
    """NAME from what follows `PREFIX:` in a `kms:` description: there is no qualifier."""
    return validate_name(rest), ""


SPEC = BackendSpec("kms", KmsSettings, "prefix", "names", split)
