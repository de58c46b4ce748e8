"""Process-wide system calls beside the key calls: no core dumps (prctl), a private filesystem
(fsopen/fsmount) in a namespace of one's own (unshare).

Not key calls, so not in the binding module (kmskeys/keyutils.py): the resolver's processes
call `disable_core_dumps` before any plaintext passes through them, and `kmskeys exec --file`
mounts its private credentials filesystem with the other two (kmskeys/credfs.py). Their C sits
in the cffi module's small helper section (kmskeys/_build_keyutils.py), reached through the
binding's `lib`, which loads and checks that module on first use.
"""

from __future__ import annotations

import os
from typing import Any

from kmskeys import keyutils

# include/uapi/linux/sched.h (kernel ABI).
CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000


def _ffi() -> Any:
    return keyutils.ffi  # type: ignore[attr-defined]  # the binding's, checked on first use


def _lib() -> Any:
    return keyutils.lib  # type: ignore[attr-defined]  # the binding's, checked on first use


def _os_error(what: str) -> OSError:
    err = _ffi().errno  # read first: any later C call may overwrite it
    return OSError(err, f"{what}: {os.strerror(err)}")


def disable_core_dumps() -> None:
    """RLIMIT_CORE 0 and PR_SET_DUMPABLE 0 for this process (the resolver's, not the client's)."""
    if _lib().kmsk_disable_core_dumps() == -1:
        raise _os_error("prctl(PR_SET_DUMPABLE)")


def private_fs(fstype: bytes, size: bytes | None) -> int:
    """fsopen + fsmount: the O_PATH fd of a new ramfs/tmpfs root (mode 0700) mounted nowhere."""
    fd: int = _lib().kmsk_private_fs(fstype, _ffi().NULL if size is None else size)
    if fd == -1:
        raise _os_error(f"fsopen({fstype.decode()})")
    return fd


def unshare(flags: int) -> None:
    """unshare(2) (os.unshare arrives with Python 3.12)."""
    if _lib().kmsk_unshare(flags) == -1:
        raise _os_error("unshare")
