"""The safe tier's `Key` and `Keyring`, over kmskeys.keyutils and kmskeys._hitpath.

What an application is told to use refuses what is unsafe by default: `get_secret`, and
`Key.request(...)`/`Key.read()` for any description, return a payload only from a key that this
process's fsuid owns (KeyOwnershipError otherwise), because a keyring shared with another uid
(a squatted named session, `su`, `runuser`) may hold a key that uid planted. The calls that
construct, re-own or re-permission keys, and the unchecked request and read the resolver side
needs, live in the low-level tier, `kmskeys.lowlevel`, where a reader knows they are sharp.
`get_secret` is the package's own (kmskeys/__init__.py), which loads this module only when a
`Key` is asked for. On the hot path of `Key.request(...).read()`: nothing is imported here that
it does not need, and each hit is one or two calls into C (kmskeys/_hitpath.c).
"""

from __future__ import annotations

from kmskeys import _hitpath, keyutils
from kmskeys.contract import USER_PAYLOAD_MAX
from kmskeys.names import as_bytes as _as_bytes

TYPE_CHECKING = False  # not `from typing import`: typing costs milliseconds to import
if TYPE_CHECKING:
    from typing import ClassVar, Self

    from kmskeys.keydesc import KeyDescription

_USER = b"user"
# A named session keyring this uid joins: possessors all, owner view/read/search/link (the
# kernel's default lacks owner SEARCH, which joining by name needs), nobody else anything.
SESSION_KEYRING_PERM = 0x3F1B0000
_SIZED_TYPES = (b"user", b"logon")
# The C calls of the hit paths (kmskeys/_hitpath.c), bound once.
_read = _hitpath.read


def _check_payload_size(type_: bytes, payload: bytes) -> None:
    if type_ not in _SIZED_TYPES or 0 < len(payload) <= USER_PAYLOAD_MAX:
        return
    from kmskeys.errors import InvalidArgumentError, PayloadTooLargeError

    if not payload:
        raise InvalidArgumentError(f"a {type_.decode()} key cannot hold an empty payload")
    raise PayloadTooLargeError(
        f"a {type_.decode()} key holds at most {USER_PAYLOAD_MAX} bytes, "
        f"this payload has {len(payload)}"
    )


def _serial(key: Key | Keyring | int) -> int:
    return key if isinstance(key, int) else key.serial


class Key:
    """A kernel key, by serial. Holding a Key grants nothing: the kernel checks every call, and
    this tier reads a payload only from a key this process's fsuid owns."""

    __slots__ = ("serial",)

    def __init__(self, serial: int) -> None:
        self.serial = int(serial)

    if TYPE_CHECKING:

        @classmethod
        def request(
            cls,
            description: str | bytes,
            callout_info: str | bytes | None = None,
            destination: Key | Keyring | int | None = None,
            type: str | bytes = _USER,
        ) -> Self: ...

    else:
        # Find a key, or have the kernel upcall to construct it when `callout_info` is not
        # None; KeyOwnershipError if the key found is not owned by this process's fsuid.
        # request_key(2) never upcalls with a NULL callout: pass b"" to upcall without one.
        # The client's hot path (budget: 1.5x C's request_key + keyctl_read, with the check):
        # the whole call is C (kmskeys/_hitpath.c key_request), which leaves anything but bytes
        # without a destination, and every failure, to kmskeys/_request.py; the check of a
        # serial this thread checked in the last second costs nothing more.
        request = classmethod(_hitpath.key_request)

    @classmethod
    def add(
        cls,
        type: str | bytes,
        description: str | bytes,
        payload: str | bytes,
        keyring: Key | Keyring | int,
    ) -> Key:
        """Add (or update) a key with `payload` in `keyring`."""
        type_ = _as_bytes(type, "key type")
        data = _as_bytes(payload, "payload")
        _check_payload_size(type_, data)
        serial = keyutils.add_key(
            type_, _as_bytes(description, "description"), data, _serial(keyring)
        )
        return cls(serial)

    def read(self) -> bytes:
        """Return the payload as bytes; KeyOwnershipError if this fsuid does not own the key."""
        try:
            found = _read(self.serial)
        except OSError as exc:
            from kmskeys._request import read_failed

            return read_failed(self.serial, exc)
        if found.__class__ is bytes:
            return found
        from kmskeys._request import read_foreign

        raise read_foreign(self.serial, *found)

    def describe(self) -> KeyDescription:
        """Return type, uid, gid, permissions and description."""
        from kmskeys.keydesc import KeyDescription

        raw = keyutils.keyctl_describe_alloc(self.serial).decode(errors="replace")
        # The description is last and may itself contain ';'.
        type_, uid, gid, perm, desc = raw.split(";", 4)
        return KeyDescription(type_, int(uid), int(gid), int(perm, 16), desc)

    def set_timeout(self, seconds: int) -> None:
        """Expire the key `seconds` from now; 0 clears the expiry."""
        keyutils.keyctl_set_timeout(self.serial, seconds)

    def revoke(self) -> None:
        """Revoke the key: every later use fails with EKEYREVOKED."""
        keyutils.keyctl_revoke(self.serial)

    def invalidate(self) -> None:
        """Invalidate the key: unlinked everywhere, so the next request re-resolves it."""
        keyutils.keyctl_invalidate(self.serial)

    def unlink(self, keyring: Key | Keyring | int) -> None:
        """Remove this key from `keyring`."""
        keyutils.keyctl_unlink(self.serial, _serial(keyring))

    def link(self, keyring: Key | Keyring | int) -> None:
        """Link this key into `keyring`."""
        keyutils.keyctl_link(self.serial, _serial(keyring))

    def update(self, payload: str | bytes) -> None:
        """Replace the payload."""
        keyutils.keyctl_update(self.serial, _as_bytes(payload, "payload"))

    def __int__(self) -> int:
        return self.serial

    def __index__(self) -> int:
        return self.serial

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other.serial == self.serial

    def __hash__(self) -> int:
        return hash(self.serial)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.serial})"


class Keyring(Key):
    """A keyring: a key that holds links to other keys.

    `Key.link(keyring)` links a key into a keyring; `add_key`, `search` and `list` act on its
    contents, and give keys of this tier.
    """

    __slots__ = ()
    _KEY: ClassVar[type[Key]] = Key  # the Key class of this tier (kmskeys.lowlevel has its own)

    @classmethod
    def _special(cls, spec: int, create: bool) -> Keyring:
        return cls(keyutils.keyctl_get_keyring_ID(spec, create))

    @classmethod
    def thread(cls, create: bool = True) -> Keyring:
        """This thread's keyring."""
        return cls._special(keyutils.KEY_SPEC_THREAD_KEYRING, create)

    @classmethod
    def process(cls, create: bool = True) -> Keyring:
        """This process's keyring."""
        return cls._special(keyutils.KEY_SPEC_PROCESS_KEYRING, create)

    @classmethod
    def session(cls, create: bool = True) -> Keyring:
        """The session keyring (shared with children, e.g. a web server's CGI processes)."""
        return cls._special(keyutils.KEY_SPEC_SESSION_KEYRING, create)

    @classmethod
    def user(cls, create: bool = True) -> Keyring:
        """The calling uid's user keyring."""
        return cls._special(keyutils.KEY_SPEC_USER_KEYRING, create)

    @classmethod
    def user_session(cls, create: bool = True) -> Keyring:
        """The calling uid's default session keyring."""
        return cls._special(keyutils.KEY_SPEC_USER_SESSION_KEYRING, create)

    @classmethod
    def join_session(cls, name: str | bytes | None = None) -> Keyring:
        """Start a new anonymous session keyring, or join the named one if this uid owns it.

        Named session keyrings can be squatted: any user may create one under the name first,
        with permissions that let it read and plant keys. A named keyring owned by another uid
        is refused (the process is left in a new anonymous session instead). Prefer the user or
        persistent keyring to share across sessions of one uid (docs/client.md).
        """
        if name is None:
            return cls(keyutils.keyctl_join_session_keyring(None))
        ring = cls(keyutils.keyctl_join_session_keyring(_as_bytes(name, "name")))
        desc = ring.describe()
        fsuid = keyutils.current_fsuid()
        if desc.uid != fsuid:
            keyutils.keyctl_join_session_keyring(None)
            from kmskeys.errors import KeyOwnershipError

            raise KeyOwnershipError(
                f"session keyring {desc.description!r} is owned by uid {desc.uid}, not by uid "
                f"{fsuid}: another user created it first; joined a new anonymous session instead"
                " - " + " ".join((KeyOwnershipError.__doc__ or "").split()),
                serial=ring.serial,
                owner=desc.uid,
            )
        # The kernel's default keyring mask lacks owner SEARCH, without which another process
        # of this uid joining the name would get a new keyring instead of this one.
        keyutils.keyctl_setperm(ring.serial, SESSION_KEYRING_PERM)
        return ring

    def add_key(self, type: str | bytes, description: str | bytes, payload: str | bytes) -> Key:
        """Add (or update) a key in this keyring; `Key.add(..., keyring)` is the same call."""
        return self._KEY.add(type, description, payload, self)

    def search(
        self,
        description: str | bytes,
        type: str | bytes = _USER,
        destination: Key | Keyring | int = 0,
    ) -> Key:
        """Search this keyring (recursively) for a key; never upcalls."""
        serial = keyutils.keyctl_search(
            self.serial,
            _as_bytes(type, "key type"),
            _as_bytes(description, "description"),
            _serial(destination),
        )
        return self._KEY(serial)

    def link_key(self, key: Key | int) -> None:
        """Link `key` into this keyring."""
        keyutils.keyctl_link(_serial(key), self.serial)

    def unlink_key(self, key: Key | int) -> None:
        """Remove `key` from this keyring."""
        keyutils.keyctl_unlink(_serial(key), self.serial)

    def list(self) -> list[Key]:
        """The keys linked into this keyring, in order."""
        # Reading a keyring yields its members as an array of native key_serial_t (int32); a
        # list of serials is no secret, so any keyring this process may read is listed.
        members = keyutils.keyctl_read(self.serial)
        return [self._KEY(s) for s in memoryview(members).cast("i")]

    def clear(self) -> None:
        """Unlink every key from this keyring."""
        keyutils.keyctl_clear(self.serial)
