"""One syslog line per request, ident `kmskeys-resolver`; /dev/kmsg when no syslog socket exists.

The line names the requesting uid, the key name, the outcome and the reason: never a payload and
never a blob. Values that come from the requester are quoted and stripped of control characters.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import time
from pathlib import Path

IDENT = "kmskeys-resolver"
LOG_ERR, LOG_WARNING, LOG_INFO = 3, 4, 6
MAX_FIELD = 160
# Characters a field may hold without quoting (kmskeys-gate renders fields the same way, from
# kmskeys/contract.h, which scripts/generate.py writes from this).
SAFE_CHARS = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./@+-:,=()'[]<>!?#%&*~^|{};"
)
_SAFE = frozenset(SAFE_CHARS)


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


KMSG = Path("/dev/kmsg")
# printk keeps a record to about 1 KiB (LOG_LINE_MAX = 1024 - 32): longer lines are cut.
KMSG_LINE_MAX = 976


class SyslogWriter:
    """Sends RFC 3164 lines to a unix datagram socket, as syslog(3) does.

    Without a syslog daemon on the socket (a container, a minimal VM, a mistyped
    `syslog_socket`), the line goes to /dev/kmsg instead, saying so: journald and `dmesg` show
    it, and request-key discards the handler's stderr, so stderr is the last resort only.
    """

    def __init__(self, socket_path: Path, facility: int, kmsg: Path = KMSG) -> None:
        self.socket_path = socket_path
        self.facility = facility
        self.kmsg = kmsg

    def emit(self, severity: int, message: str) -> None:
        """Send one line; fall back to /dev/kmsg, then stderr, if the socket refuses it."""
        priority = self.facility * 8 + severity
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime())
        line = f"<{priority}>{stamp} {IDENT}[{os.getpid()}]: {message}"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never wait for a slow syslog daemon: the kernel keeps the requester that
                # started the upcall blocked until this process exits.
                sock.setblocking(False)
                sock.connect(os.fspath(self.socket_path))
                sock.send(line.encode("utf-8", "replace"))
                return
        except OSError as exc:
            why = f"syslog socket {self.socket_path}: {exc.strerror or type(exc).__name__}"
            # A daemon that listens but is behind (its queue full) is there: a flood of
            # requests must not become a flood of the kernel's log, which it would push out.
            busy = exc.errno in (errno.EAGAIN, errno.ENOBUFS)
        note = f" ({why}; logged to {self.kmsg} instead)"
        if not busy and self._kmsg(priority, message, note):
            return
        with contextlib.suppress(OSError, ValueError):
            print(f"{IDENT}[{os.getpid()}]: {message} ({why})", file=sys.stderr, flush=True)

    def _kmsg(self, priority: int, message: str, note: str) -> bool:
        # One write is one record; a non-zero facility in <N> marks it as from user space
        # (devkmsg_write), and journald then takes the `IDENT[PID]:` as its identifier.
        head = f"<{priority}>{IDENT}[{os.getpid()}]: "
        # The newline ends the record: without it printk keeps it open for a continuation,
        # and readers see it only when the next record arrives.
        text = (head + message)[: KMSG_LINE_MAX - len(note)] + note + "\n"
        try:
            fd = os.open(self.kmsg, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            return False
        try:
            os.write(fd, text.encode("utf-8", "replace"))
        except OSError:
            return False
        finally:
            os.close(fd)
        return True
