"""Thin layer over libkeyutils: one typed function per C call, each checking its return value.

Nothing above this module touches `lib` or `ffi` (bar kmskeys/lowlevel/process.py, for the
process-wide calls beside the key calls); nothing here knows about secrets, blobs or who owns a
key (the owner check is kmskeys/key.py's, over kmskeys/_hitpath.c). Payloads and descriptions
are bytes; lengths are the C library's size_t, never adjusted by hand.
"""

from __future__ import annotations

# threading.local is _thread._local; importing `threading` itself would cost ~2 ms (collections,
# functools) on the client's import path.
from _thread import _local as thread_local

# The hit-path extension's build stamp is checked by `import kmskeys`; the cffi module's by
# _Binding, when it loads.
from kmskeys import _verify_stamp

TYPE_CHECKING = False  # not `from typing import`: typing costs milliseconds to import
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from kmskeys._keyutils_cffi import ffi, lib


class _Binding:
    """Stands for `ffi` or `lib` (kmskeys._keyutils_cffi) until the first call that needs one:
    that call imports the cffi module, checks its build stamp and puts the real two in their
    place. get_secret's hit and full paths are kmskeys/_hitpath.c, so `import kmskeys` and a
    cached secret never load cffi, which is about a quarter of the client's import time (python
    -X importtime: the cffi backend, libpthread and the module), paid by every CGI process
    (tests/bench/cgi.py)."""

    def __init__(self, which: str) -> None:
        self.which = which

    def __getattr__(self, name: str) -> Any:
        from kmskeys._keyutils_cffi import ffi as real_ffi
        from kmskeys._keyutils_cffi import lib as real_lib

        _verify_stamp("_keyutils_cffi", real_ffi.string(real_lib.kmsk_build_stamp()).decode())
        globals().update(ffi=real_ffi, lib=real_lib)
        return getattr(real_ffi if self.which == "ffi" else real_lib, name)


if not TYPE_CHECKING:
    ffi, lib = _Binding("ffi"), _Binding("lib")


def load_binding() -> None:
    """Load the cffi module now: before a process changes to an identity that may not be able to
    read the installation (a forked child becoming another user)."""
    getattr(lib, "keyctl_read")  # noqa: B009 (the lazy binding's __getattr__ does the load)


# include/uapi/linux/keyctl.h: the special keyring ids (kernel ABI; tests/unit holds them to
# libkeyutils' own).
KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5
KEY_SPEC_GROUP_KEYRING = -6
KEY_SPEC_REQKEY_AUTH_KEY = -7

# Read buffers need no zeroing on allocation: they are wiped after use instead.
_UNCLEARED: list[Callable[[str, int], Any]] = []


def _new_uncleared(cdecl: str, size: int) -> Any:
    if not _UNCLEARED:
        _UNCLEARED.append(ffi.new_allocator(should_clear_after_alloc=False))
    return _UNCLEARED[0](cdecl, size)


# Most secrets are passwords and tokens: one read syscall with a buffer this size serves them.
READ_GUESS = 1024
# Each thread keeps one such buffer between reads, wiped after every use.
_spare = thread_local()


def _fail(what: str, *, upcall: bool = False, description: str | None = None) -> Exception:
    err = ffi.errno  # read first: any later C call may overwrite it
    # kmskeys.errors is imported on failure only: it is off the client's import-time budget.
    from kmskeys.errors import error_for_errno

    return error_for_errno(err, what, upcall=upcall, description=description)


def add_key(type_: bytes, description: bytes, payload: bytes, keyring: int) -> int:
    """add_key(2): create or update a key in `keyring`; return its serial."""
    serial: int = lib.add_key(type_, description, payload, len(payload), keyring)
    if serial == -1:
        raise _fail("add_key")
    return serial


def request_key(type_: bytes, description: bytes, callout_info: bytes | None, keyring: int) -> int:
    """request_key(2): find a key, or construct it through the upcall when callout_info is set."""
    serial: int = lib.request_key(
        type_, description, ffi.NULL if callout_info is None else callout_info, keyring
    )
    if serial == -1:
        desc = description.decode(errors="replace")
        raise _fail("request_key " + desc[:256], upcall=callout_info is not None, description=desc)
    return serial


def keyctl_read(key: int) -> bytes:
    """Read a key's payload, with one syscall when it fits READ_GUESS bytes; wipe the buffer.

    A larger payload costs a second read, sized by what the first returned. (keyctl_read_alloc
    would always cost two syscalls and a malloc.)
    """
    # The thread's spare buffer is taken out while in use: a signal handler that reads another
    # key between our syscall and our copy gets a buffer of its own, never ours (a wrong secret
    # is the one thing worse than none).
    try:
        buf = _spare.buf
        del _spare.buf
    except AttributeError:
        buf = _new_uncleared("char[]", READ_GUESS)
    spare, size = buf, READ_GUESS
    while True:
        got: int = lib.keyctl_read(key, buf, size)
        if got == -1:
            _spare.buf = spare
            raise _fail("keyctl_read")
        # keyctl_read returns the full payload size even when the buffer is smaller.
        if got <= size:
            payload: bytes = ffi.unpack(buf, got)
            lib.explicit_bzero(buf, got)
            _spare.buf = spare
            return payload
        lib.explicit_bzero(buf, size)
        # Larger than the usual secret (or grown since): read again with room for it.
        buf, size = _new_uncleared("char[]", got), got


def keyctl_describe_alloc(key: int) -> bytes:
    """Return the raw `type;uid;gid;perm;description` string of a key."""
    out = ffi.new("char **")
    size: int = lib.keyctl_describe_alloc(key, out)
    if size == -1:
        raise _fail("keyctl_describe")
    try:
        raw: bytes = ffi.string(out[0])
        return raw
    finally:
        lib.free(out[0])


def keyctl_instantiate(key: int, payload: bytes, keyring: int) -> None:
    """Instantiate a key under construction (needs assumed authority) and link it to `keyring`."""
    if lib.keyctl_instantiate(key, payload, len(payload), keyring) == -1:
        raise _fail("keyctl_instantiate")


def keyctl_reject(key: int, timeout: int, error: int, keyring: int) -> None:
    """Negatively instantiate a key so requesters get `error` for `timeout` seconds."""
    if lib.keyctl_reject(key, timeout, error, keyring) == -1:
        raise _fail("keyctl_reject")


def keyctl_negate(key: int, timeout: int, keyring: int) -> None:
    """Negatively instantiate a key with ENOKEY for `timeout` seconds."""
    if lib.keyctl_negate(key, timeout, keyring) == -1:
        raise _fail("keyctl_negate")


def keyctl_assume_authority(key: int) -> None:
    """Assume the authority to instantiate `key` (0 gives it up)."""
    if lib.keyctl_assume_authority(key) == -1:
        raise _fail("keyctl_assume_authority")


def keyctl_set_timeout(key: int, timeout: int) -> None:
    """Expire the key `timeout` seconds from now (0 clears the expiry)."""
    if lib.keyctl_set_timeout(key, timeout) == -1:
        raise _fail("keyctl_set_timeout")


def keyctl_revoke(key: int) -> None:
    """Revoke a key: later access fails with EKEYREVOKED."""
    if lib.keyctl_revoke(key) == -1:
        raise _fail("keyctl_revoke")


def keyctl_invalidate(key: int) -> None:
    """Invalidate a key: it is unlinked everywhere and garbage-collected."""
    if lib.keyctl_invalidate(key) == -1:
        raise _fail("keyctl_invalidate")


def keyctl_unlink(key: int, keyring: int) -> None:
    """Remove the link from `keyring` to `key`."""
    if lib.keyctl_unlink(key, keyring) == -1:
        raise _fail("keyctl_unlink")


def keyctl_link(key: int, keyring: int) -> None:
    """Link `key` into `keyring`."""
    if lib.keyctl_link(key, keyring) == -1:
        raise _fail("keyctl_link")


def keyctl_clear(keyring: int) -> None:
    """Unlink every key from `keyring`."""
    if lib.keyctl_clear(keyring) == -1:
        raise _fail("keyctl_clear")


def keyctl_search(keyring: int, type_: bytes, description: bytes, dest_keyring: int) -> int:
    """Search `keyring` recursively for a key; link it into dest_keyring if that is non-zero."""
    serial: int = lib.keyctl_search(keyring, type_, description, dest_keyring)
    if serial == -1:
        raise _fail("keyctl_search")
    return serial


def keyctl_setperm(key: int, perm: int) -> None:
    """Set the key's permission mask."""
    if lib.keyctl_setperm(key, perm) == -1:
        raise _fail("keyctl_setperm")


def keyctl_chown(key: int, uid: int, gid: int) -> None:
    """Change the key's owner and group (-1 leaves one unchanged)."""
    if lib.keyctl_chown(key, uid & 0xFFFFFFFF, gid & 0xFFFFFFFF) == -1:
        raise _fail("keyctl_chown")


def keyctl_update(key: int, payload: bytes) -> None:
    """Replace a key's payload."""
    if lib.keyctl_update(key, payload, len(payload)) == -1:
        raise _fail("keyctl_update")


def keyctl_get_persistent(uid: int, keyring: int) -> int:
    """This uid's persistent keyring (-1: the caller's), linked into `keyring`; its serial."""
    serial: int = lib.keyctl_get_persistent(uid & 0xFFFFFFFF, keyring)
    if serial == -1:
        raise _fail("keyctl_get_persistent")
    return serial


def current_fsuid() -> int:
    """The fsuid the kernel checks key permissions with (setfsuid(-1) changes nothing)."""
    return int(lib.setfsuid(0xFFFFFFFF)) & 0xFFFFFFFF


def set_fsuid(uid: int) -> int:
    """setfsuid(2): check key (and file) permissions as `uid` from now on; the previous fsuid.
    It reports no error: the caller checks with current_fsuid()."""
    return int(lib.setfsuid(uid & 0xFFFFFFFF)) & 0xFFFFFFFF


def set_fsgid(gid: int) -> int:
    """setfsgid(2): check key (and file) permissions with group `gid` from now on; the previous
    fsgid. It reports no error: the caller checks with current_fsgid()."""
    return int(lib.setfsgid(gid & 0xFFFFFFFF)) & 0xFFFFFFFF


def current_fsgid() -> int:
    """The fsgid the kernel checks key group permissions with (setfsgid(-1) changes nothing)."""
    return int(lib.setfsgid(0xFFFFFFFF)) & 0xFFFFFFFF


def keyctl_get_keyring_ID(key: int, create: bool) -> int:
    """Resolve a special keyring id (e.g. KEY_SPEC_SESSION_KEYRING) to its serial."""
    serial: int = lib.keyctl_get_keyring_ID(key, 1 if create else 0)
    if serial == -1:
        raise _fail("keyctl_get_keyring_ID")
    return serial


def keyctl_join_session_keyring(name: bytes | None) -> int:
    """Join the named session keyring, or a new anonymous one when `name` is None."""
    serial: int = lib.keyctl_join_session_keyring(ffi.NULL if name is None else name)
    if serial == -1:
        raise _fail("keyctl_join_session_keyring")
    return serial


def explicit_bzero(buffer: bytearray | memoryview, size: int) -> None:
    """Zero the first `size` bytes of a writable buffer with libc's explicit_bzero (a memset the
    compiler may not drop): half the cost of copying zeros in from Python."""
    have = len(buffer) if buffer.__class__ is bytearray else memoryview(buffer).nbytes
    if not 0 <= size <= have:
        raise ValueError(f"cannot wipe {size} bytes of a {have}-byte buffer")
    if size:
        lib.explicit_bzero(ffi.from_buffer(buffer, require_writable=True), size)
