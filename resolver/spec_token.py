"""The `token:` backend's declaration: the host's PKCS#11 token, its grammar, its per-name policy.

Light on purpose: resolver/config.py composes this table on every miss, whatever the backend.
The token settings serve two uses, so one table holds them: `token:NAME` blobs (resolver/
tokenbackend.py) and the keystore seal `seal = "pkcs11"` (resolver/tokenseal.py). The PIN comes
from a root-only file or a systemd credential of the resolver's own, never from argv or the
requester's environment (resolver/pkcs11seal.py, docs/tokens.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kmskeys import contract
from kmskeys.names import validate_name
from resolver.backend import BackendSpec
from resolver.errors import ConfigError
from resolver.settings import policy, setting
from resolver.validators import NameRule, abs_path, prefix, text

KEY_ID_HEX = 64  # SHA-256 of the key's SubjectPublicKeyInfo, kmskeys.tokenblob.key_id
MAX_LABEL = 32  # CK_TOKEN_INFO.label is 32 bytes, blank-padded (PKCS#11 v2.40)


def label(value: object, where: str) -> str:
    """A token or key label: printable ASCII, at most 32 characters."""
    found = text(value, where)
    if len(found) > MAX_LABEL or not found.isascii() or not found.isprintable():
        raise ConfigError(f"{where} must be 1 to {MAX_LABEL} printable ASCII characters")
    return found


def credential_name(value: object, where: str) -> str:
    """A systemd credential name: one path component."""
    found = text(value, where)
    if "/" in found or found in (".", "..") or not found.isprintable() or len(found) > 255:
        raise ConfigError(f"{where} must be a credential name (LoadCredential=NAME:...)")
    return found


def key_id_hex(value: object, where: str) -> str:
    """The SHA-256 key id of the token key, 64 hex digits (`kmskeys inspect` shows it)."""
    found = text(value, where).lower()
    if len(found) != KEY_ID_HEX or not set(found) <= set("0123456789abcdef"):
        raise ConfigError(f"{where} must be {KEY_ID_HEX} hex digits (SHA-256 of the public key)")
    return found


@dataclass(frozen=True, init=False, repr=False, eq=False)
class Pkcs11Settings:
    """`token:NAME`: a `kmsp2:` blob in blob_dir/NAME.kmsp, opened by a key on the host's
    PKCS#11 token; the same token seals the keystore with `seal = "pkcs11"`."""

    token_prefix: str = setting(
        contract.DEFAULT_TOKEN_PREFIX,
        prefix,
        "description namespace of token blobs, `TOKEN_PREFIX:NAME`; must differ from every "
        "other prefix (docs/tokens.md)",
    )
    token_module: Path | None = setting(
        None,
        abs_path,
        "the PKCS#11 module (SoftHSM2, ykcs11, OpenSC); required for `token:` and "
        '`seal = "pkcs11"`',
        examples=('"/usr/lib/x86_64-linux-gnu/libykcs11.so"',),
        note="the PKCS#11 module of the host's token",
    )
    token_label: str | None = setting(
        None,
        label,
        "the token's label (CK_TOKEN_INFO.label)",
        examples=('"kmskeys"',),
    )
    token_key_label: str | None = setting(
        None,
        label,
        "the label of the RSA key pair on the token (2048 to 4096 bits)",
        examples=('"Private key for Key Management"',),
    )
    token_pin_file: Path | None = setting(
        None,
        abs_path,
        "the user PIN in a root-owned file of mode 0600 or stricter (one line); or "
        "`token_pin_credential`, not both. Never argv, never the environment",
        examples=('"/etc/kmskeys/token.pin"',),
        note="root-only (0600); or token_pin_credential",
    )
    token_pin_credential: str | None = setting(
        None,
        credential_name,
        "the user PIN as a systemd credential of the resolver's own (`LoadCredential=` in its "
        "unit, read from `$CREDENTIALS_DIRECTORY`)",
        examples=('"kmskeys-token-pin"',),
    )
    token_key_id: str | None = setting(
        None,
        key_id_hex,
        "pin the token key: its id (SHA-256 of the public key, as `kmskeys inspect` shows it); "
        "a token whose key differs is refused (a replaced token)",
        examples=('"3f1c..."',),
    )
    token_rules: tuple[NameRule, ...] = policy(
        "per-name policy of `token:` names (below)",
        "token_prefix",
        ("ttl", "allow_users"),
        '[token."db/*"]\nallow_users = ["postgres"]',
        keys=("token",),
    )

    @property
    def token_configured(self) -> bool:
        """Whether a token is set up (module, labels and a PIN source)."""
        return self.token_module is not None

    def check_token(self, where: str, seal: str) -> None:
        """Refuse a token set up by halves, and a token seal without a token."""
        named = (self.token_module, self.token_label, self.token_key_label)
        pins = (self.token_pin_file, self.token_pin_credential)
        if not any(named) and not any(pins) and self.token_key_id is None:
            if seal == "pkcs11":
                raise ConfigError(
                    f'{where}: seal = "pkcs11" needs the token: token_module, token_label, '
                    "token_key_label and token_pin_file (or token_pin_credential)"
                )
            return
        if not all(named):
            raise ConfigError(
                f"{where}: a token needs token_module, token_label and token_key_label"
            )
        if (self.token_pin_file is None) == (self.token_pin_credential is None):
            raise ConfigError(
                f"{where}: a token needs exactly one of token_pin_file and token_pin_credential"
            )


def split(rest: str) -> tuple[str, str]:
    """NAME from what follows `PREFIX:` in a `token:` description: there is no qualifier."""
    return validate_name(rest), ""


SPEC = BackendSpec("token", Pkcs11Settings, "token_prefix", "token_rules", split)
