"""The key system calls are allowed here, and /sbin/request-key is there to run for a miss."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from kmskeys import contract, keyutils
from kmskeys.doctor.finding import FAIL, OK, Finding
from kmskeys.errors import KeyctlError

REQUEST_KEY = Path(contract.REQUEST_KEY)


def check_keyctl() -> Iterator[Finding]:
    """keyctl(2) and request_key(2) usable at all (Docker's default seccomp blocks both)."""
    blocked = []
    try:
        keyutils.keyctl_get_keyring_ID(keyutils.KEY_SPEC_SESSION_KEYRING, False)
    except KeyctlError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            blocked.append(f"keyctl: {errno.errorcode[exc.errno]}")
    try:
        # A NULL callout never upcalls: ENOKEY when the syscall works.
        keyutils.request_key(b"user", b"kmskeys-doctor:probe", None, 0)
    except KeyctlError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            blocked.append(f"request_key: {errno.errorcode[exc.errno]}")
    if blocked:
        yield Finding(
            FAIL,
            "keyctl",
            f"the key system calls are blocked here ({', '.join(blocked)}): a seccomp filter "
            "such as Docker's default profile, which refuses keyctl, add_key and request_key; no "
            "secret can be fetched from this process (docs/containers.md)",
            "run the container with a seccomp profile that allows keyctl, add_key and "
            "request_key: docker run --security-opt seccomp=kmskeys-seccomp.json ... "
            "(docs/containers.md shows how to make it)",
        )
        return
    yield Finding(OK, "keyctl", "keyctl and request_key are allowed")


def check_request_key() -> Iterator[Finding]:
    """/sbin/request-key present: the kernel runs it for every miss."""
    if os.access(REQUEST_KEY, os.X_OK):
        yield Finding(OK, "request-key", f"{REQUEST_KEY} present")
        return
    manager = "apt-get" if shutil.which("apt-get") else "dnf" if shutil.which("dnf") else "yum"
    yield Finding(
        FAIL,
        "request-key",
        f"{REQUEST_KEY} missing: the kernel has nothing to run for a miss",
        f"{manager} install -y keyutils",
    )
