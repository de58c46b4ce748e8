"""A secret written to stdout whole, or one line that says why not (`kmskeys get`).

As bin/kmskeys.c does: straight to fd 1, in as many writes as it takes, so no copy of the
secret stays in a Python buffer for the interpreter to flush (and fail on again, with a
traceback) at exit. Stdlib only: loaded by the Python CLI's `get` alone.
"""

from __future__ import annotations

import errno
import os
import sys


def write_stdout(data: bytes) -> None:
    """Write all of `data` to stdout; OSError (its errno) if stdout refuses any of it."""
    stdout = sys.stdout
    if stdout is None:  # fd 1 was closed when Python started: it may have been reused since
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    stdout.flush()  # whatever was written before goes first
    if stdout is not sys.__stdout__:  # main() called in-process with a stream of the caller's
        stdout.buffer.write(data)
        stdout.buffer.flush()
        return
    view, done = memoryview(data), 0
    while done < len(data):
        try:
            written = os.write(1, view[done:])
        except BlockingIOError:  # a non-blocking stdout: wait until it drains
            import select

            select.select([], [1], [])
            continue
        if written == 0:
            raise OSError(errno.EIO, "short write")
        done += written


def written(data: bytes, prog: str) -> bool:
    """Write `data` to stdout: True; or say why not in one line on stderr, never the data (a
    full disk, a pipe whose reader is gone, a closed stdout): False (exit status 1)."""
    try:
        write_stdout(data)
    except OSError as exc:
        print(f"{prog}: stdout: {exc.strerror or 'short write'}", file=sys.stderr)
        return False
    return True
