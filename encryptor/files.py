"""Bounded reads of secrets and blobs, and atomic writes of blob files (temp file + rename)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from encryptor.errors import InputError, OutputError

BLOB_FILE_MODE = 0o644  # blobs are ciphertext: the resolver (root) and deploy tools read them


def read_bounded(source: str | Path, limit: int, what: str, too_big: str = "") -> bytes:
    """At most `limit` bytes from `source` (a path, or '-' for stdin); more is an InputError."""
    try:
        if str(source) == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(source, "rb") as handle:
                data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} from {str(source)!r}: {exc.strerror}") from None
    if len(data) > limit:
        raise InputError(too_big or f"{what} is over {limit} bytes")
    return data


def write_atomic(path: Path, data: bytes, mode: int = BLOB_FILE_MODE) -> None:
    """Write `data` to `path` via a temp file in the same directory and a rename."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # mkstemp creates 0600
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror}") from None
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
