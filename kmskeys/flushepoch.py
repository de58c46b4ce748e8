"""The flush epoch: root's `kmskeys flush` happens before every answer that starts after it.

A miss already running when root flushes would otherwise land after the flush with the value it
read before it (cached for the full ttl), and re-create the host-cache entry the flush removed.
So root's flush first replaces a random token in the install's root-only state_dir
(`state_dir/flush/`: one file for everything, one per prefix, one per name), and only then
invalidates keys and host-cache entries. The resolver reads the tokens of its request before it
reads anything else (`mark`), and compares them again (`Mark.changed`) at the two points where
an answer becomes visible:

- before instantiating or rejecting the key, after the key was given its owner, the admin group
  and its mask (resolver/answer.py): a flush that had not bumped the token by then finds the key
  in /proc/keys and invalidates it (invalidation waits for a key under construction); a flush
  that had, makes the resolver resolve again;
- in the host cache: each entry carries the token it was made under, and a request with another
  token treats it as absent (resolver/hostcache.py, resolver/cachedfetch.py), so an entry that
  lands late answers no request that started after the flush.

Written here by root's flush (kmskeys/hostflush.py), read by the resolver; stdlib and
kmskeys.fileio only. The token of a name covers its selectors (`sm:prod/db#password` is
`sm:prod/db`'s), as a flush of the name reaches them.
"""

from __future__ import annotations

import os

# hashlib.blake2b is this very class; hashlib would also load OpenSSL on the resolver's miss path.
from _blake2 import blake2b
from dataclasses import dataclass
from pathlib import Path

from kmskeys import fileio

FLUSH_DIR = "flush"
EVERYTHING = "all"
_TOKEN_BYTES = 16
# The most a token file may hold (what is read of one, and what kmskeys-gate compares).
TOKEN_MAX = 64
# The most token files one request has (everything, its prefix, its name) and the longest name
# of one ("n-" and 32 hex digits): kmskeys-gate's bounds, through kmskeys/contract.h.
TOKEN_FILES_MAX = 3
TOKEN_FILE_NAME_MAX = 34

# Each token file of a request, and what it holds (None: absent).
Tokens = tuple[tuple[str, bytes | None], ...]


def _name_file(prefix: str, name: str) -> str:
    head = name.partition("#")[0]
    return "n-" + blake2b(f"{prefix}:{head}".encode(), digest_size=16).hexdigest()


def _prefix_file(prefix: str) -> str:
    return "p-" + blake2b(prefix.encode(), digest_size=16).hexdigest()


def _files(prefix: str, name: str | None) -> tuple[str, ...]:
    files = (EVERYTHING, _prefix_file(prefix))
    return files if name is None else (*files, _name_file(prefix, name))


@dataclass(frozen=True)
class Mark:
    """The flush tokens of one request (its state_dir, prefix and name) when it started."""

    state_dir: Path
    prefix: str
    name: str | None
    token: bytes

    def changed(self) -> bool:
        """True if root flushed this request's name (or its prefix, or everything) since."""
        return current(self.state_dir, self.prefix, self.name) != self.token

    def tokens(self) -> Tokens | None:
        """The token files as they read now if no flush reached this request since, else None:
        what kmskeys-gate compares again, at its last moment before an answer (the daemon's
        path; docs/resolver.md). Read once and compared to the mark, so that a flush between
        this comparison and the gate's is seen by the gate."""
        found = read_tokens(self.state_dir, self.prefix, self.name)
        return found if _digest(found) == self.token else None


def mark(state_dir: Path, prefix: str, name: str | None = None) -> Mark:
    """The tokens of `prefix:name` now: taken before a request reads anything."""
    return Mark(state_dir, prefix, name, current(state_dir, prefix, name))


def current(state_dir: Path, prefix: str, name: str | None = None) -> bytes:
    """The tokens of `prefix:name` (every flush that reaches it changes them), as 8 bytes."""
    return _digest(read_tokens(state_dir, prefix, name))


def read_tokens(state_dir: Path, prefix: str, name: str | None = None) -> Tokens:
    """Each token file of `prefix:name` in `state_dir/flush/` and its bytes (None: absent)."""
    files = _files(prefix, name)
    try:
        dir_fd = fileio.open_dir(
            Path(state_dir) / FLUSH_DIR, f"flush epoch {state_dir}/{FLUSH_DIR}", fileio.PRIVATE
        )
    except fileio.UntrustedFileError as exc:
        if exc.problem == fileio.MISSING:
            return tuple((file, None) for file in files)  # never flushed
        raise
    try:
        found: list[tuple[str, bytes | None]] = []
        for file in files:
            try:
                token: bytes | None = fileio.read_file(
                    file, TOKEN_MAX, "flush epoch", fileio.PRIVATE, dir_fd=dir_fd
                )
            except fileio.UntrustedFileError as exc:
                if exc.problem != fileio.MISSING:
                    raise
                token = None
            found.append((file, token))
        return tuple(found)
    finally:
        os.close(dir_fd)


def _digest(tokens: Tokens) -> bytes:
    if all(token is None for _, token in tokens):
        return bytes(8)  # never flushed: as with no directory
    digest = blake2b(digest_size=8)
    for _, token in tokens:
        held = token or b""
        digest.update(len(held).to_bytes(1) + held)
    return digest.digest()


def bump(state_dir: Path, prefix: str | None, name: str | None) -> None:
    """Change the token a flush of `prefix:name` reaches (prefix None: everything). Root."""
    state = fileio.open_dir(state_dir, f"state_dir {state_dir}", fileio.CREATE | fileio.PRIVATE)
    try:
        os.close(
            fileio.open_dir(FLUSH_DIR, "flush epoch", fileio.CREATE | fileio.PRIVATE, dir_fd=state)
        )
    finally:
        os.close(state)
    if prefix is None:
        file = EVERYTHING
    elif name is None:
        file = _prefix_file(prefix)
    else:
        file = _name_file(prefix, name)
    fileio.write_atomic(Path(state_dir) / FLUSH_DIR / file, os.urandom(_TOKEN_BYTES), 0o600)
