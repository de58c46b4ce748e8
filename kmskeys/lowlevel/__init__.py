"""The low-level tier: keys without the owner check, and the calls that make and re-own them.

`kmskeys.Key` and `kmskeys.Keyring` (the safe tier, kmskeys/key.py) read a payload only from a
key this process's fsuid owns. The resolver side needs more: to request and read keys whatever
their owner (the request's authorization key, root's host cache), to construct a key under
construction (`assume_authority`, `instantiate`, `reject`, `negate`) and to give it its owner
and mask (`chown`, `setperm`). Those calls are here, where a reader knows they are sharp, as in
pyca/cryptography's `hazmat` under its recipes. An application never needs this module.

    from kmskeys.lowlevel import Key, Keyring

`Key` here is a `kmskeys.Key` with those methods added and the check taken off `request` and
`read`; `Keyring` is a `kmskeys.Keyring` whose `add_key`, `search` and `list` give such keys.
Process-wide calls beside the key calls are in `kmskeys.lowlevel.process`.
"""

from __future__ import annotations

from kmskeys import key as _safe
from kmskeys import keyutils
from kmskeys.keydesc import KeyDescription
from kmskeys.names import as_bytes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar

_KeyArg = _safe.Key | int


def _serial(key: _KeyArg) -> int:
    return key if isinstance(key, int) else key.serial


class Key(_safe.Key):
    """A kernel key, by serial, with no owner check: the kernel's permission checks alone."""

    __slots__ = ()

    @classmethod
    def request(
        cls,
        description: str | bytes,
        callout_info: str | bytes | None = None,
        destination: _KeyArg | None = None,
        type: str | bytes = b"user",
    ) -> Key:
        """request_key(2), whoever owns the key found (the safe tier's check is not made)."""
        callout = None if callout_info is None else as_bytes(callout_info, "callout info")
        desc = as_bytes(description, "description")
        try:
            serial = keyutils.request_key(
                as_bytes(type, "key type"),
                desc,
                callout,
                0 if destination is None else _serial(destination),
            )
        except OSError as exc:
            from kmskeys._request import request_failed

            raise request_failed(exc, desc, callout) from None
        return cls(serial)

    def read(self) -> bytes:
        """Return the payload as bytes, whoever owns the key."""
        return keyutils.keyctl_read(self.serial)

    def instantiate(self, payload: str | bytes, keyring: _KeyArg = 0) -> None:
        """Instantiate this key under construction (resolver side, with authority assumed)."""
        keyutils.keyctl_instantiate(self.serial, as_bytes(payload, "payload"), _serial(keyring))

    def reject(self, timeout: int, error: int, keyring: _KeyArg = 0) -> None:
        """Negatively instantiate: requesters get `error` for `timeout` seconds."""
        keyutils.keyctl_reject(self.serial, timeout, error, _serial(keyring))

    def negate(self, timeout: int, keyring: _KeyArg = 0) -> None:
        """Negatively instantiate with ENOKEY for `timeout` seconds."""
        keyutils.keyctl_negate(self.serial, timeout, _serial(keyring))

    def assume_authority(self) -> None:
        """Assume the authority to instantiate this key (resolver side)."""
        keyutils.keyctl_assume_authority(self.serial)

    def setperm(self, perm: int) -> None:
        """Set the permission mask (KEY_POS_*, KEY_USR_*, ... bits)."""
        keyutils.keyctl_setperm(self.serial, perm)

    def chown(self, uid: int, gid: int = -1) -> None:
        """Change owner and group; -1 leaves one unchanged."""
        keyutils.keyctl_chown(self.serial, uid, gid)


class Keyring(Key, _safe.Keyring):
    """A keyring of the low-level tier: its members are low-level `Key`s."""

    __slots__ = ()
    _KEY: ClassVar[type[_safe.Key]] = Key


__all__ = ["Key", "KeyDescription", "Keyring"]
