"""The Python side of the safe tier's C calls (kmskeys/_hitpath.c): off the hit path.

`kmskeys.Key.request` is C (`_hitpath.key_request`) for bytes arguments without a destination;
the C code imports this module the first time it meets anything else (`request_slow`) or a
failure or a key another uid owns (`destination_hook`, `failed_hook`), so `import kmskeys`
never loads it. A request_key(2) whose destination the kernel would not link the key into is
answered here for both `get_secret` and `Key.request` (`found_in_destination`). The
errors of `get_secret` and `Key.read` are made here too. A failure the kernel now caches is
named as such (kmskeys/cached.py: which negative key, when it expires, who put it there, the
flush that drops it).
"""

from __future__ import annotations

import errno
import os

from kmskeys import _hitpath, keyutils
from kmskeys.errors import KmsKeysError, error_for_errno, foreign_key_error
from kmskeys.names import as_bytes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn, Protocol, TypeVar

    class _Serial(Protocol):
        serial: int

    K = TypeVar("K")


def request_failed(exc: OSError, description: bytes, callout: bytes | None) -> Exception:
    """The client's error for a failed request_key(2) of `description`."""
    desc = description.decode(errors="replace")
    if isinstance(exc, KmsKeysError):
        err: KmsKeysError = exc
    else:
        upcall = callout is not None
        err = error_for_errno(
            exc.errno or 0, "request_key " + desc[:256], upcall=upcall, description=desc
        )
    if callout is None:
        return err
    from kmskeys.cached import explained

    return explained(err, desc)


def fetch_failed(
    exc: OSError, description: bytes, callout: bytes | None, dest: int
) -> tuple[int, bytes]:
    """get_secret's request_key(2) failed: the key found in `dest` after all (owner-checked and
    read as the hit path does), or the error (`found_in_destination`)."""
    serial = found_in_destination(exc, description, callout, dest)
    try:
        found = _hitpath.read(serial)  # Key.read's owner check and read
    except OSError as read_exc:
        return serial, read_failed(serial, read_exc)
    if isinstance(found, bytes):
        return serial, found
    raise read_foreign(serial, *found)


def found_in_destination(
    exc: OSError, description: bytes, callout: bytes | None, dest: int, type: bytes = b"user"
) -> int:
    """request_key(2) of `description` into `dest` failed with `exc`: the serial of the key
    already in `dest`, or the client's error. The caller checks its owner.

    With a destination, request_key(2) links the key it finds into it, and checks LINK for
    that: a key bound to a program grants LINK to nobody (kmskeys.contract.PROGRAM_KEY_PERM;
    docs/security.md, section 12), so asking again for it with keyring="session" (or
    Key.request's destination) is EACCES, even though the resolver answered it into that very
    keyring. A key already there needs no link: keyctl_search(2) of `dest` finds it (possessed
    through `dest`, on its possessor SEARCH) and links nothing. A key found elsewhere is never
    linked into `dest`: the error says so.
    """
    if exc.errno != errno.EACCES or not dest:
        raise request_failed(exc, description, callout) from None
    try:
        serial: int = keyutils.keyctl_search(dest, type, description, 0)
    except OSError:
        desc = description.decode(errors="replace")
        cause = (
            "the key found may not be linked into the requested keyring: a secret bound to a "
            "program (allow_units, allow_cgroups, allow_exe) is kept in its requester's own "
            "keyring and never linked into another; ask without keyring= (Key.request: without "
            "a destination), or with the keyring of its first request (docs/security.md, "
            "section 12)"
        )
        raise error_for_errno(errno.EACCES, "request_key " + desc[:256], cause=cause) from None
    return serial


def foreign(description: str, found: tuple[int, None, int, int]) -> Exception:
    """KeyOwnershipError for a key found under `description` that this fsuid does not own."""
    serial, _, owner, fsuid = found
    return foreign_key_error(description, serial, owner, fsuid)


def failed_hook(
    description: bytes, callout: bytes | None, err: int, found: tuple[int, None, int, int] | None
) -> NoReturn:
    """A failure of `_hitpath.key_request`: raise the client's error for it."""
    if found is not None:
        raise foreign(description.decode(errors="replace"), found)
    raise request_failed(OSError(err, os.strerror(err)), description, callout)


def destination_hook(
    description: bytes, callout: bytes | None, err: int, dest: int, type: bytes | None
) -> int:
    """`_hitpath.key_request`'s request_key(2) failed with `err`: the serial of the key already
    in `dest` when the kernel could not link it there (`found_in_destination`; the C code then
    checks its owner), else raise the client's error."""
    exc = OSError(err, os.strerror(err))
    return found_in_destination(exc, description, callout, dest, b"user" if type is None else type)


def request_slow(
    cls: type[K],
    description: str | bytes,
    callout_info: str | bytes | None = None,
    destination: _Serial | int | None = None,
    type: str | bytes = b"user",
) -> K:
    """Key.request with arguments the C fast path does not take (a str, a Key as destination):
    converted, then the same C call. `cls` is the kmskeys.Key (sub)class it was made on."""
    desc = as_bytes(description, "description")
    callout = None if callout_info is None else as_bytes(callout_info, "callout info")
    key_type = as_bytes(type, "key type")
    for what, value in (("description", desc), ("callout info", callout), ("key type", key_type)):
        if value is not None and b"\0" in value:
            # request_key(2) takes C strings: the kernel would see less than was asked for.
            raise error_for_errno(errno.EINVAL, f"request_key: the {what} holds a NUL byte")
    if destination is None or isinstance(destination, int):
        dest = int(destination or 0)
    else:
        dest = destination.serial
    key: K = _hitpath.key_request(cls, desc, callout, dest, key_type)
    return key


def read_failed(serial: int, exc: OSError) -> bytes:
    """Key.read's C call failed: a payload over its buffer is read another way (after the
    check passed), anything else is the client's error."""
    if exc.errno == errno.EMSGSIZE:
        # A big_key or a large keyring: over the C path's 32767-byte buffer.
        return keyutils.keyctl_read(serial)
    raise error_for_errno(exc.errno or 0, "keyctl_read") from None


def read_foreign(serial: int, owner: int, fsuid: int) -> Exception:
    """KeyOwnershipError for Key(serial).read() of a key this fsuid does not own."""
    return foreign_key_error(f"key {serial}", serial, owner, fsuid)
