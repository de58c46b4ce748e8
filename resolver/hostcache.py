"""The host cache: each decrypted secret kept once per host, in kernel memory only root can reach.

A requester's keyring caches a secret for that keyring alone: a new service, a cron job in a fresh
session or another uid each cost a handler run and a KMS Decrypt. The handler therefore also keeps
the plaintext in a keyring linked from root's persistent keyring (kmskeys.hostflush), keyed so
that only an identical request can hit it: prefix, name, the user for a user-bound blob, and the
BLAKE2b-256 digest of the blob's canonical text (`Blob.identity()`: every spelling the parser
accepts, and the version-1 form of a version-2 blob, share one entry; a redeployed blob is a new
one). Policy, the blob's expiry, its recorded name and the key allowlist are checked before the
cache is consulted (resolver/blobs.py).

An entry's payload is an 8-byte header (the CLOCK_BOOTTIME second of its decrypt, so its age
does not depend on the wall clock) and the plaintext. It is fresh for the name's `ttl`; after
that, it is kept for `stale_grace` more seconds to answer when KMS is unavailable. The kernel
expires it after max(ttl, stale_grace) + 1 s. The keyring lives as long as root's persistent
keyring: the handler touches that on every run, which restarts its expiry timer
(kernel.keys.persistent_keyring_expiry, 3 days by default); a reboot empties it.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

# hashlib.blake2b is this very class; importing hashlib would also load OpenSSL's libcrypto,
# 2 to 3 ms on every miss (python -X importtime), for a digest this one gives as well.
from _blake2 import blake2b
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kmskeys import keyutils
from kmskeys.contract import HOSTCACHE_PERM, USER_PAYLOAD_MAX
from kmskeys.errors import KmsKeysError
from kmskeys.hostflush import host_cache_ring
from resolver.limits import open_state_file

_HEADER = struct.Struct("=d")
# Refreshes of one entry by handlers of different keyrings wait for each other (one Decrypt per
# host, not one per keyring that missed at the same moment); lock files are striped so that
# state_dir holds a bounded number of them.
LOCK_STRIPES = 64
REFRESH_WAIT = 1.0  # seconds a miss waits for another handler's refresh of its stripe


def blob_digest(text: bytes) -> str:
    """The hex BLAKE2b-256 of a blob's canonical text (`Blob.identity()`)."""
    return blake2b(text, digest_size=32).hexdigest()


def boottime() -> float:
    """Seconds since boot, counting suspend: every process on the host shares this clock."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class Entry:
    """A host-cache entry: its key serial, the plaintext and its age in seconds."""

    serial: int
    plaintext: bytes
    age: float


class Cache(Protocol):
    """What the `kms:` backend asks of a host cache (HostCache; an in-memory one in tests)."""

    def lookup(self, desc: str) -> Entry | None:
        """The entry described `desc`, or None."""
        ...

    def store(self, desc: str, plaintext: bytes, lifetime: int) -> bool:
        """Keep `plaintext` as `desc` for `lifetime` seconds; False if it is not kept."""
        ...

    def purge(self, desc: str) -> None:
        """Drop the entry described `desc`, if there is one."""
        ...

    def refreshing(self, state_dir: Path, desc: str) -> AbstractContextManager[None]:
        """Hold the refresh lock of `desc` for the block (bounded wait)."""
        ...


class HostCache:
    """The host-cache keyring, as its root possessor sees it."""

    def __init__(self) -> None:
        self._ring: int | None = None

    def ring(self) -> int:
        """The keyring's serial, found or created on first use."""
        if self._ring is None:
            ring = host_cache_ring(create=True)
            assert ring is not None
            self._ring = ring
        return self._ring

    def lookup(self, desc: str) -> Entry | None:
        """The entry described `desc`, or None (absent, expired, unreadable)."""
        try:
            serial = keyutils.keyctl_search(self.ring(), b"user", desc.encode(), 0)
            payload = keyutils.keyctl_read(serial)
        except KmsKeysError:
            return None
        if len(payload) <= _HEADER.size:
            return None
        (stamp,) = _HEADER.unpack_from(payload)
        return Entry(serial, payload[_HEADER.size :], max(0.0, boottime() - stamp))

    def store(self, desc: str, plaintext: bytes, lifetime: int) -> bool:
        """Keep `plaintext` as `desc` for `lifetime` seconds; False if it does not fit a key."""
        if len(plaintext) + _HEADER.size > USER_PAYLOAD_MAX:
            return False  # a `user` key holds 32767 bytes: such a secret is not host-cached
        payload = _HEADER.pack(boottime()) + plaintext
        try:
            # add_key with an existing description updates that key in place.
            serial = keyutils.add_key(b"user", desc.encode(), payload, self.ring())
            keyutils.keyctl_setperm(serial, HOSTCACHE_PERM)
            keyutils.keyctl_set_timeout(serial, lifetime)
        except KmsKeysError:
            return False  # the cache is an optimisation: the requester is answered anyway
        return True

    def purge(self, desc: str) -> None:
        """Invalidate the entry described `desc`, if there is one."""
        try:
            serial = keyutils.keyctl_search(self.ring(), b"user", desc.encode(), 0)
            keyutils.keyctl_invalidate(serial)
        except KmsKeysError:
            pass

    @contextmanager
    def refreshing(self, state_dir: Path, desc: str) -> Iterator[None]:
        """Hold the refresh lock of `desc` (one of LOCK_STRIPES flock files in state_dir), or
        go on without it after REFRESH_WAIT."""
        stripe = int.from_bytes(blake2b(desc.encode(), digest_size=4).digest()) % LOCK_STRIPES
        fd = open_state_file(state_dir, f"hostcache-{stripe}")
        try:
            # A refresher of this entry is done in a KMS round trip; the wait is bounded because
            # a stripe is shared with other names: one name's hung KMS call (another uid's,
            # say) must not hold up an unrelated miss. Past the bound, refresh unlocked (at
            # worst one more Decrypt).
            give_up = time.monotonic() + REFRESH_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= give_up:
                        break
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)
