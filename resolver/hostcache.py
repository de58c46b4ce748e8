"""The host cache: each decrypted secret kept once per host, in kernel memory only root can reach.

A requester's keyring caches a secret for that keyring alone: a new service, a cron job in a fresh
session or another uid each cost a handler run and a KMS Decrypt. The handler therefore also keeps
the plaintext in a keyring linked from root's persistent keyring (kmskeys.hostflush), keyed so
that only an identical request can hit it: prefix, name, the user for a user-bound blob, and the
BLAKE2b-256 digest of the blob's canonical text (`Blob.identity()`: every spelling the parser
accepts, and the version-1 form of a version-2 blob, share one entry; a redeployed blob is a new
one). Policy, the blob's expiry, its recorded name and the key allowlist are checked before the
cache is consulted (resolver/blobs.py); how a request goes through the cache (fresh, refresh,
stale) is resolver/cachedfetch.py.

An entry's payload is a 16-byte header (the CLOCK_BOOTTIME second of its decrypt, so its age
does not depend on the wall clock, and the flush epoch of the request that made it:
kmskeys/flushepoch.py) and the plaintext. A request under another epoch treats the entry as
absent: an entry that a miss already running when root flushed lands afterwards answers no
request that started after the flush. It is fresh for the name's `ttl`; after
that, it is kept for `stale_grace` more seconds to answer when KMS is unavailable. The kernel
expires it after max(ttl, stale_grace) + 1 s. The keyring lives as long as root's persistent
keyring: the handler touches that on every run, which restarts its expiry timer
(kernel.keys.persistent_keyring_expiry, 3 days by default); a reboot empties it.

Every entry costs root's kernel key quota, so each is charged to the uid whose request made it
(its `charged_uid`): at most `host_cache_keys_per_uid` entries and `host_cache_bytes_per_uid`
bytes each (uid 0's own are not counted), and none that would take root past
`host_cache_root_share` of its quota. Past a charge the answer is given, only not kept.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

# hashlib.blake2b is this very class; importing hashlib would also load OpenSSL's libcrypto,
# 2 to 3 ms on every miss (python -X importtime), for a digest this one gives as well.
from _blake2 import blake2b
from _thread import get_ident
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kmskeys import keyutils
from kmskeys.contract import HOSTCACHE_ENTRY_PREFIX, HOSTCACHE_PERM, USER_PAYLOAD_MAX
from kmskeys.errors import KmsKeysError
from kmskeys.hostflush import host_cache_ring
from kmskeys.keyusers import PROC_KEY_USERS, key_quota
from resolver.errors import ConfigError
from resolver.limits import charged_uid, open_state_file

if TYPE_CHECKING:
    from resolver.config import Config

_HEADER = struct.Struct("=d8s")
# Refreshes of one entry by handlers of different keyrings wait for each other (one Decrypt per
# host, not one per keyring that missed at the same moment). Each entry locks one byte of a
# single lock file, at an offset from its description's hash (an open-file-description record
# lock, F_OFD_SETLK: it excludes threads of one process too, and goes with the fd as flock
# does): 2**62 stripes, so unrelated names practically never share one (with 64 flock files,
# root's miss once waited REFRESH_WAIT behind another uid's hung KMS call), and one file.
LOCK_FILE = "hostcache-locks"
LOCK_STRIPES = 1 << 62
# struct flock (fcntl(2)): l_type, l_whence, l_start, l_len, l_pid; 0 for l_pid (OFD locks).
_FLOCK = struct.Struct("hhqqi4x")
REFRESH_WAIT = 1.0  # seconds a miss waits for another handler's refresh of its stripe
# A uid's charges: state_dir/CHARGE_PREFIX + UID holds one record per entry it made, (serial,
# bytes, CLOCK_BOOTTIME second the kernel drops it), and is locked while an entry is added.
CHARGE_PREFIX = "hccharge-"
_CHARGE = struct.Struct("=iqd")


def blob_digest(text: bytes) -> str:
    """The hex BLAKE2b-256 of a blob's canonical text (`Blob.identity()`)."""
    return blake2b(text, digest_size=32).hexdigest()


def boottime() -> float:
    """Seconds since boot, counting suspend: every process on the host shares this clock."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def stripe_of(desc: str) -> int:
    """Which of the LOCK_STRIPES refresh locks (a byte offset of LOCK_FILE) `desc` takes."""
    return int.from_bytes(blake2b(desc.encode(), digest_size=8).digest()) % LOCK_STRIPES


def _try_lock(fd: int, stripe: int) -> bool:
    """Take the write lock of byte `stripe` of fd's file without waiting; False if it is held."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, stripe, 1, 0))
    except (BlockingIOError, PermissionError):  # EAGAIN, or EACCES on some kernels
        return False
    return True


@dataclass(frozen=True)
class Entry:
    """A host-cache entry: its key serial, the plaintext and its age in seconds."""

    serial: int
    plaintext: bytes
    age: float
    epoch: bytes = bytes(8)  # the flush epoch it was made under (kmskeys/flushepoch.py)


class Kept:
    """What `store` did: true when the entry was kept, else `reason` says why not (the answer
    is given all the same: the cache is an optimisation)."""

    __slots__ = ("kept", "reason")

    def __init__(self, kept: bool, reason: str = "") -> None:
        self.kept = kept
        self.reason = reason

    def __bool__(self) -> bool:
        return self.kept

    def __repr__(self) -> str:
        return f"Kept({self.kept}, {self.reason!r})"


class RefreshLock:
    """The refresh lock of one entry's stripe: `held` or not. Whoever finishes the refresh
    releases it, the request itself or the background refresh it was handed to
    (resolver/background.py), which then owns `fd`."""

    __slots__ = ("fd", "held")

    def __init__(self, fd: int, held: bool) -> None:
        self.fd = fd
        self.held = held

    def hand_over(self) -> int:
        """The fd, now the caller's to close: release() no longer closes it."""
        fd, self.fd = self.fd, -1
        return fd

    def release(self) -> None:
        """Drop the lock (close the fd) unless it was handed over."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RefreshLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Cache(Protocol):
    """What a backend asks of a host cache (HostCache; an in-memory one in tests)."""

    def lookup(self, desc: str) -> Entry | None:
        """The entry described `desc`, or None."""
        ...

    def store(
        self, desc: str, plaintext: bytes, lifetime: int, *, uid: int, epoch: bytes = bytes(8)
    ) -> Kept:
        """Keep `plaintext` as `desc` for `lifetime` seconds, charged to the requester `uid`,
        made under the flush `epoch`."""
        ...

    def purge(self, desc: str) -> None:
        """Drop the entry described `desc`, if there is one."""
        ...

    def lock(self, state_dir: Path, desc: str, wait: float) -> RefreshLock:
        """The refresh lock of `desc`, waiting up to `wait` s for it (then not held)."""
        ...


class HostCache:
    """The host-cache keyring, as its root possessor sees it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._ring: int | None = None
        self._holder = (0, 0)

    def ring(self) -> int:
        """The keyring's serial, found or created on first use in this process and thread."""
        # Possession goes with the credentials the lookup installed the process keyring in: a
        # forked child gets no process keyring (copy_creds drops it without CLONE_THREAD), and
        # a thread that existed before it was installed does not see it (commit_creds changes
        # the calling thread's credentials only). Such a caller finds the ring again.
        holder = (os.getpid(), get_ident())
        if self._ring is None or self._holder != holder:
            ring = host_cache_ring(create=True)
            assert ring is not None
            self._ring, self._holder = ring, holder
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
        stamp, epoch = _HEADER.unpack_from(payload)
        return Entry(serial, payload[_HEADER.size :], max(0.0, boottime() - stamp), epoch)

    def store(
        self, desc: str, plaintext: bytes, lifetime: int, *, uid: int, epoch: bytes = bytes(8)
    ) -> Kept:
        """Keep `plaintext` as `desc` for `lifetime` seconds, charged to `uid`'s charged uid,
        made under the flush `epoch`; not kept past the uid's charge, root's quota share, or a
        `user` key's size."""
        if len(plaintext) + _HEADER.size > USER_PAYLOAD_MAX:
            # A `user` key holds 32767 bytes: such a secret is not host-cached.
            return Kept(False, f"not kept: over {USER_PAYLOAD_MAX - _HEADER.size} bytes")
        payload = _HEADER.pack(boottime(), epoch) + plaintext
        # What the kernel's quota counts: the description and the payload.
        cost = len(desc.encode()) + len(payload)
        try:
            existing = self._serial(desc)
            crowded = root_quota_problem(self.config.host_cache_root_share, cost, existing is None)
            if crowded is not None:
                return Kept(False, f"not kept: {crowded}")
            charged = charged_uid(self.config, uid)
            if charged == 0:
                # Root's own requests and prefetch: root's choice of blob_dir, not charged.
                self._add(desc, payload, lifetime)
                return Kept(True)
            return self._charged(charged, desc, payload, lifetime, existing)
        except (KmsKeysError, ConfigError, OSError) as exc:
            return Kept(False, f"not kept: {exc}")

    def purge(self, desc: str) -> None:
        """Invalidate the entry described `desc`, if there is one."""
        try:
            serial = keyutils.keyctl_search(self.ring(), b"user", desc.encode(), 0)
            keyutils.keyctl_invalidate(serial)
        except KmsKeysError:
            pass

    def lock(self, state_dir: Path, desc: str, wait: float) -> RefreshLock:
        """The refresh lock of `desc` (its byte of LOCK_FILE in state_dir), waiting up to
        `wait` s; past that, not held (the caller decides what to do without it)."""
        fd = open_state_file(state_dir, LOCK_FILE)
        stripe = stripe_of(desc)
        give_up = time.monotonic() + wait
        try:
            while not _try_lock(fd, stripe):
                if time.monotonic() >= give_up:
                    os.close(fd)
                    return RefreshLock(-1, False)
                time.sleep(0.01)
        except BaseException:
            os.close(fd)
            raise
        return RefreshLock(fd, True)

    @contextmanager
    def refreshing(self, state_dir: Path, desc: str) -> Iterator[None]:
        """Hold the refresh lock of `desc` for the block, or go on without it after
        REFRESH_WAIT (a stripe is shared with other names: one name's hung KMS call must not
        hold up an unrelated miss; past the bound, at worst one more Decrypt)."""
        with self.lock(state_dir, desc, REFRESH_WAIT):
            yield

    def _serial(self, desc: str) -> int | None:
        try:
            return keyutils.keyctl_search(self.ring(), b"user", desc.encode(), 0)
        except KmsKeysError:
            return None

    def _add(self, desc: str, payload: bytes, lifetime: int) -> int:
        # add_key with an existing description updates that key in place (same serial).
        serial = keyutils.add_key(b"user", desc.encode(), payload, self.ring())
        keyutils.keyctl_setperm(serial, HOSTCACHE_PERM)
        keyutils.keyctl_set_timeout(serial, lifetime)
        return serial

    def _charged(
        self, charged: int, desc: str, payload: bytes, lifetime: int, existing: int | None
    ) -> Kept:
        """Add the entry if `charged`'s entries stay within its charge, and record it."""
        config = self.config
        fd = open_state_file(config.state_dir, f"{CHARGE_PREFIX}{charged}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the uid's stores, one at a time
            records = [r for r in _read_charges(fd) if r[0] != existing and _alive(r)]
            keys, total = len(records) + 1, sum(r[1] for r in records) + len(desc) + len(payload)
            if keys > config.host_cache_keys_per_uid or total > config.host_cache_bytes_per_uid:
                _write_charges(fd, records)
                return Kept(
                    False,
                    f"not kept: uid {charged} is at its host-cache charge ({len(records)} "
                    f"entries, {total - len(desc) - len(payload)} bytes; host_cache_keys_per_uid "
                    f"{config.host_cache_keys_per_uid}, host_cache_bytes_per_uid "
                    f"{config.host_cache_bytes_per_uid})",
                )
            serial = self._add(desc, payload, lifetime)
            records.append((serial, len(desc) + len(payload), boottime() + lifetime))
            _write_charges(fd, records)
            return Kept(True)
        finally:
            os.close(fd)


def _read_charges(fd: int) -> list[tuple[int, int, float]]:
    raw = os.pread(fd, 1 << 24, 0)
    usable = len(raw) - len(raw) % _CHARGE.size
    return [_CHARGE.unpack_from(raw, at) for at in range(0, usable, _CHARGE.size)]


def _write_charges(fd: int, records: list[tuple[int, int, float]]) -> None:
    data = b"".join(_CHARGE.pack(*record) for record in records)
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _alive(record: tuple[int, int, float]) -> bool:
    """Whether a charge still stands: its entry is not past its lifetime, and the serial is
    still a host-cache entry (not flushed, purged, or reused by another key)."""
    serial, _, ends = record
    if boottime() >= ends:
        return False
    try:
        described = keyutils.keyctl_describe_alloc(serial).split(b";", 4)
    except KmsKeysError:
        return False
    return (
        len(described) == 5
        and described[0] == b"user"
        and described[1] == b"0"
        and described[4].startswith(HOSTCACHE_ENTRY_PREFIX.encode())
    )


def root_quota_problem(share: float, cost: int, new_key: bool) -> str | None:
    """Why an entry of `cost` bytes would take root past `share` of its key quota, or None
    (also when /proc/key-users cannot be read: the kernel's own quota still holds)."""
    found = root_quota()
    if found is None:
        return None
    keys, max_keys, used, max_bytes = found
    if keys + new_key <= share * max_keys and used + cost <= share * max_bytes:
        return None
    return (
        f"root's key quota would pass host_cache_root_share {share:g} ({keys}/{max_keys} keys, "
        f"{used}/{max_bytes} bytes in use)"
    )


def root_quota(path: Path = PROC_KEY_USERS) -> tuple[int, int, int, int] | None:
    """(keys, max keys, bytes, max bytes) of uid 0's kernel key quota, or None if unknown."""
    try:
        return key_quota(0, path)
    except OSError:
        return None
