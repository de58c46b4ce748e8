"""DPAPI's chunks: a blob's body in chunks, from memory or a stream, in buffers wiped after use.

Bytes already in memory (a memoryview, an io.BytesIO's own bytes) are sliced where they are; a
stream is read into two alternating buffers taken from a small pool and zeroed when they held
plaintext. kmskeys.dpapi seals and opens the chunks; kmskeys.protectblob frames them.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator

from kmskeys import keyutils
from kmskeys.protectblob import DEFAULT_CHUNK

TYPE_CHECKING = False  # not `from typing import`: a fresh `kmskeys unprotect` pays for typing
if TYPE_CHECKING:
    from typing import Protocol

    class Reader(Protocol):
        """What protect and unprotect read from: a binary file object."""

        def readinto(self, buffer: bytearray | memoryview, /) -> int | None: ...

        def read(self, size: int = -1, /) -> bytes: ...

    class Writer(Protocol):
        """What they write to."""

        def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...


def wipe_bytes(buf: bytearray | memoryview, size: int) -> None:
    """Zero the first `size` bytes of `buf` (plaintext our code held): one memset."""
    keyutils.explicit_bzero(buf, size)


# Stream buffers are reused from call to call (wiped when they held plaintext): a fresh
# megabyte costs its page faults every time.
POOL: list[bytearray] = []
POOL_MAX = 6  # two streams' worth: three buffers each
POOLED_MAX_BYTES = 2 * DEFAULT_CHUNK  # a blob with huge chunks does not pin its buffers


def take(size: int) -> bytearray:
    for at, buf in enumerate(POOL):
        if len(buf) == size:
            return POOL.pop(at)
    return bytearray(size)


def give(*buffers: bytearray) -> None:
    for buf in buffers:
        if len(POOL) < POOL_MAX and len(buf) <= POOLED_MAX_BYTES:
            POOL.append(buf)


def _with_last(items: Iterable[memoryview]) -> Iterator[tuple[int, memoryview, bool]]:
    """(index, item, is_last) for each item of a stream: one item of lookahead.

    The next item is taken before the current one is handed out, so a source may reuse a
    buffer only every other item (the stream readers alternate between two).
    """
    it = iter(items)
    prev = next(it, None)
    if prev is None:
        return
    index = 0
    for item in it:
        yield index, prev, False
        prev, index = item, index + 1
    yield index, prev, True


def pieces(view: memoryview, size: int, *, empty_chunk: bool) -> list[tuple[int, memoryview, bool]]:
    """(index, chunk, is_last) for each chunk of a view in memory: slices, no copy."""
    if not view:
        return [(0, view, True)] if empty_chunk else []
    last = (len(view) - 1) // size
    return [(i, view[i * size : (i + 1) * size], i == last) for i in range(last + 1)]


def unread_bytes(src: io.BytesIO) -> memoryview | None:
    """The unread part of an io.BytesIO as a view of its own bytes, or None.

    CPython's getvalue() returns the object's bytes without a copy unless a view of them is
    exported (getbuffer()), when it returns a copy, which would be plaintext of ours that a
    bytes object cannot wipe: that case is told by truncate() at the current size, a no-op that
    raises BufferError while a view is exported, and is read into buffers of ours instead.
    Otherwise the position moves to the end, as reading it all would leave it.
    """
    at = src.tell()
    end = src.seek(0, io.SEEK_END)
    try:
        src.truncate(end)
    except BufferError:
        src.seek(at)
        return None
    return memoryview(src.getvalue())[at:]


class Chunks:
    """(index, chunk, is_last) for the chunks of `src`, `size` bytes each but the last: slices
    of bytes already in memory (a memoryview, or an io.BytesIO's own bytes: reading them into a
    buffer of ours would be one more copy, of the plaintext, which would then need wiping), or
    reads of a stream into two alternating buffers, which `release(wipe=True)` zeroes once, at
    the end.

    `empty_chunk`: an empty input is one empty chunk (plaintext), or no chunk (ciphertext).
    """

    def __init__(self, src: Reader | memoryview, size: int, *, empty_chunk: bool) -> None:
        if isinstance(src, io.BytesIO):
            src = unread_bytes(src) or src
        self.src, self.size, self.empty_chunk = src, size, empty_chunk
        self.buffers: tuple[bytearray, ...] = ()
        self.used = [0, 0]

    def __iter__(self) -> Iterator[tuple[int, memoryview, bool]]:
        if isinstance(self.src, memoryview):
            return iter(pieces(self.src, self.size, empty_chunk=self.empty_chunk))
        return _with_last(self._read(self.src))

    def _read(self, src: Reader) -> Iterator[memoryview]:
        self.buffers = (take(self.size), take(self.size))
        for turn in itertools.count():
            view = memoryview(self.buffers[turn % 2])
            got = 0
            while got < self.size:
                n = src.readinto(view[got:])
                if not n:
                    break
                got += n
            self.used[turn % 2] = max(self.used[turn % 2], got)
            if got or (turn == 0 and self.empty_chunk):
                yield view[:got]
            if got < self.size:
                return

    def release(self, *, wipe: bool) -> None:
        """Hand the buffers back, zeroed first when they held plaintext (after the last chunk)."""
        if wipe:
            for buf, n in zip(self.buffers, self.used, strict=False):
                wipe_bytes(buf, n)
        give(*self.buffers)
        self.buffers = ()
