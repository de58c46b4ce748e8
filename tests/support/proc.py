"""Run a function in a forked child under another uid and bring back a small result."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

NOBODY = 65534


def run_as(uid: int, gid: int, func: Callable[[], object], *, new_session: bool = True) -> object:
    """Fork, drop to uid/gid (and a fresh session keyring unless told otherwise), return func()."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            if new_session:
                # A new session keyring drops possession of the parent's keys: only the
                # permissions granted to this uid are left.
                from kmskeys import Keyring

                Keyring.join_session()
            result: object = {"ok": func()}
        except BaseException as exc:  # report every failure to the parent
            result = {"error": type(exc).__name__, "errno": getattr(exc, "errno", None)}
            code = 1
        try:
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)
