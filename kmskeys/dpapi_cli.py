"""`kmskeys protect` and `kmskeys unprotect`: DPAPI from the shell, stdin to stdout, any size.

Loaded only when one of the two is asked for (kmskeys.cli), so `kmskeys get` never imports this
or `cryptography`. Errors propagate to kmskeys.cli, which prints one line and picks the exit code.

unprotect writes a chunk only once it has authenticated, but a later chunk may still fail (a
truncated or changed blob). Then, if stdout is a regular file, it is truncated back to where
unprotect began, so no partial plaintext is left; on a pipe the reader has already had the good
chunks and must go by the exit status, as with `age` or `gpg` (docs/dpapi.md).
"""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import stat
import sys
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

from kmskeys.contract import DEFAULT_STORED_PREFIX
from kmskeys.dpapi import DEFAULT_NAME, protect_stream, unprotect_stream
from kmskeys.stored import SCOPE_USER, SCOPES

TYPE_CHECKING = False  # not `from typing import`: a fresh process pays for typing
if TYPE_CHECKING:
    from typing import BinaryIO

MAX_ENTROPY_BYTES = 1 << 20


def _read_entropy(path: Path | None) -> bytes:
    if path is None:
        return b""
    with path.open("rb") as f:
        data = f.read(MAX_ENTROPY_BYTES + 1)
    if len(data) > MAX_ENTROPY_BYTES:
        raise ValueError(f"--entropy-file {path} is larger than {MAX_ENTROPY_BYTES} bytes")
    return data


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--entropy-file",
        type=Path,
        metavar="F",
        help="extra secret mixed into the key; the same file is needed to unprotect",
    )
    parser.add_argument(
        "--prefix",
        default=DEFAULT_STORED_PREFIX,
        help="description namespace of the host's stored: keys (default: %(default)s)",
    )


def protect_main(argv: Sequence[str]) -> int:
    """`kmskeys protect [--scope S] [--name N] [--entropy-file F] [--description D] < in > out`."""
    parser = argparse.ArgumentParser(
        prog="kmskeys protect",
        description="Protect stdin to stdout under this host's master key (DPAPI).",
    )
    parser.add_argument("--scope", choices=SCOPES, default=SCOPE_USER)
    parser.add_argument("--name", default=DEFAULT_NAME, help="master key name (%(default)s)")
    parser.add_argument("--description", default="", help="readable label, authenticated")
    _common(parser)
    args = parser.parse_args(argv)
    protect_stream(
        _stdin(),
        sys.stdout.buffer,
        name=args.name,
        scope=args.scope,
        entropy=_read_entropy(args.entropy_file),
        description=args.description,
        prefix=args.prefix,
    )
    sys.stdout.buffer.flush()
    return 0


def _stdin() -> io.FileIO:
    # Unbuffered: chunks are read straight into their buffers, with no second copy.
    return open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)


def _rollback_point(out: BinaryIO) -> Callable[[], None]:
    """A function that removes what was written to `out` from now on, if `out` is a file."""
    try:
        fd = out.fileno()
        st = os.fstat(fd)
    except (OSError, ValueError):
        return lambda: None
    if not stat.S_ISREG(st.st_mode):
        return lambda: None
    appending = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
    start = st.st_size if appending else os.lseek(fd, 0, os.SEEK_CUR)

    def undo() -> None:
        with suppress(OSError, ValueError):
            out.flush()
        os.ftruncate(fd, start)
        os.lseek(fd, start, os.SEEK_SET)

    return undo


def unprotect_main(argv: Sequence[str]) -> int:
    """`kmskeys unprotect [--entropy-file F] [--show-description] < in > out`."""
    parser = argparse.ArgumentParser(
        prog="kmskeys unprotect",
        description="Unprotect stdin (what kmskeys protect wrote) to stdout.",
    )
    parser.add_argument(
        "--show-description",
        action="store_true",
        help="print the blob's authenticated description to stderr after success",
    )
    _common(parser)
    args = parser.parse_args(argv)
    entropy = _read_entropy(args.entropy_file)
    out = sys.stdout.buffer
    undo = _rollback_point(out)
    try:
        header = unprotect_stream(_stdin(), out, entropy=entropy, prefix=args.prefix)
        out.flush()
    except BaseException:
        undo()
        raise
    if args.show_description:
        print(f"description: {header.description}", file=sys.stderr)
    return 0
