"""Forget the user and user-session keyrings of a uid the test made, once the test is done.

The kernel keeps a uid's `_uid.UID` and `_uid_ses.UID` keyrings in its user namespace's
register (`.user_reg`) from the uid's first use until they are invalidated: neither deleting the
account nor the uid's last process removes them (keyrings(7), since Linux 5.3). A test that
requests as a uid of its own (a subordinate uid, a user it adds) would leave two keys for that
uid on the host, run after run: a day of runs left a thousand uids in /proc/key-users, and every
read of /proc/keys walks them. Root cannot invalidate them (they grant root no permission),
so a child process takes the uid and invalidates its own two.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from kmskeys import keyutils
from kmskeys.errors import KmsKeysError


def forget(uids: Iterable[int]) -> None:
    """Invalidate each uid's user and user-session keyrings (the key GC then frees them)."""
    keyutils.load_binding()  # in this process: the child of a threaded one must not dlopen
    for uid in uids:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, which exits without returning
            os._exit(_forget_as(uid))
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"could not invalidate the user keyrings of uid {uid}")


def _forget_as(uid: int) -> int:
    try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        keyrings = [
            keyutils.keyctl_get_keyring_ID(special, True)
            for special in (keyutils.KEY_SPEC_USER_KEYRING, keyutils.KEY_SPEC_USER_SESSION_KEYRING)
        ]
        for keyring in keyrings:
            keyutils.keyctl_invalidate(keyring)
    except (OSError, KmsKeysError):
        return 1
    return 0
