"""One syslog line per request, ident `kmskeys-resolver`; stderr when no syslog socket exists.

The line names the requesting uid, the key name, the outcome and the reason: never a payload and
never a blob. Values that come from the requester are quoted and stripped of control characters.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path

IDENT = "kmskeys-resolver"
LOG_ERR, LOG_WARNING, LOG_INFO = 3, 4, 6
MAX_FIELD = 160
_SAFE = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./@+-:,=()'[]<>!?#%&*~^|{};"
)


def field(value: object) -> str:
    """A log-safe rendering of `value`: bare when plain, double-quoted and escaped otherwise."""
    text = str(value)
    if len(text) > MAX_FIELD:
        text = text[:MAX_FIELD] + "..."
    if text and _SAFE.issuperset(text):
        return text
    escaped = "".join(
        ch if ch.isprintable() and ch not in '"\\' else f"\\x{ord(ch):02x}" for ch in text
    )
    return f'"{escaped}"'


def format_fields(**fields: object) -> str:
    """`k=v k2="v 2"` in the given order, skipping None values."""
    return " ".join(f"{k}={field(v)}" for k, v in fields.items() if v is not None)


class SyslogWriter:
    """Sends RFC 3164 lines to a unix datagram socket, as syslog(3) does."""

    def __init__(self, socket_path: Path, facility: int) -> None:
        self.socket_path = socket_path
        self.facility = facility

    def emit(self, severity: int, message: str) -> None:
        """Send one line; fall back to stderr if the socket is missing or refuses it."""
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime())
        line = f"<{self.facility * 8 + severity}>{stamp} {IDENT}[{os.getpid()}]: {message}"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never wait for a slow syslog daemon: the kernel keeps the requester that
                # started the upcall blocked until this process exits.
                sock.setblocking(False)
                sock.connect(os.fspath(self.socket_path))
                sock.send(line.encode("utf-8", "replace"))
        except OSError:
            # No syslog daemon (containers, minimal VMs): stderr, which request-key may discard.
            with contextlib.suppress(OSError, ValueError):
                print(f"{IDENT}[{os.getpid()}]: {message}", file=sys.stderr, flush=True)
