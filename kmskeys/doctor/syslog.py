"""The handler's syslog socket: else its lines go to /dev/kmsg (dmesg, journalctl -k)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from kmskeys.checkreport import ConfigLoaded
from kmskeys.doctor.finding import INFO, OK, WARN, Finding, q

DEV_LOG = Path("/dev/log")
KMSG = Path("/dev/kmsg")


def check_syslog(config: ConfigLoaded, path: Path) -> Iterator[Finding]:
    """The handler's syslog socket: else its lines go to /dev/kmsg (dmesg, journalctl -k)."""
    socket_path = Path(config["syslog_socket"])
    if listens(socket_path):
        yield Finding(OK, "syslog", f"the handler logs to syslog at {socket_path}")
        return
    if socket_path != DEV_LOG and listens(DEV_LOG):
        yield Finding(
            WARN,
            "syslog",
            f"syslog socket {socket_path} missing, but {DEV_LOG} is there: the handler's lines "
            "go to /dev/kmsg (dmesg, journalctl -k) instead of syslog",
            "sed -i 's|^[[:space:]]*syslog_socket[[:space:]]*=.*|syslog_socket = \"/dev/log\"|' "
            f"{q(path)}",
        )
    elif os.access(KMSG, os.W_OK) or (os.geteuid() != 0 and KMSG.exists()):
        yield Finding(
            INFO,
            "syslog",
            f"no syslog daemon at {socket_path}: the handler's lines go to /dev/kmsg, which "
            "dmesg and journalctl -k show (dmesg | grep kmskeys-resolver)",
        )
    else:
        yield Finding(
            WARN,
            "syslog",
            f"no syslog daemon at {socket_path} and no /dev/kmsg: the handler's lines are lost",
            "mknod -m 600 /dev/kmsg c 1 11",
        )


def listens(path: Path) -> bool:
    """Something receives on the unix datagram socket `path` (as the handler sends)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return False  # missing, not a socket, or nobody bound to it (ECONNREFUSED)
    return True
