"""Record every open of a file in one directory, through the kernel's inotify (ctypes, no deps).

    with OpenWatch(parent) as watch:
        ... run untrusted requests ...
    assert watch.opened() == []

inotify reports IN_OPEN for any process, root included, which is what an escape from blob_dir
would do: open a file next to it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
from pathlib import Path

IN_ACCESS = 0x001
IN_OPEN = 0x020
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")


class OpenWatch:
    """Collects (name, is_dir) for every open or read of an entry of `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = -1
        self._events: list[tuple[str, bool]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OpenWatch:
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._fd = fd
        wd = self._libc.inotify_add_watch(fd, os.fsencode(self.directory), IN_OPEN | IN_ACCESS)
        if wd < 0:
            os.close(fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {self.directory}")
        self._thread = threading.Thread(target=self._run, name="open-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(self._fd)

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if ready:
                self._read()
        self._read()

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
            offset += _EVENT.size + length
            name = raw.rstrip(b"\0").decode("utf-8", "replace")
            self._events.append((name, bool(mask & IN_ISDIR)))

    def opened(self, ignore: tuple[str, ...] = ()) -> list[tuple[str, bool]]:
        """Entries opened or read so far, except the names in `ignore`."""
        return [event for event in self._events if event[0] not in ignore]
