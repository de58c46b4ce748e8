"""Root's `kmskeys flush`: every cached copy of a name on the host, any uid's, and the host cache.

A key another uid owns is invisible to root in /proc/keys (no VIEW) and cannot be invalidated
(no SEARCH): key permissions grant root no override. The resolver gives each key it instantiates
the group `kmskeys-admin` with group VIEW|SEARCH only (kmskeys.contract.ADMIN_GROUP, whose
comment says why the group has no members). Root takes that gid as its fsgid for as long as it
lists and invalidates; it never gets READ or LINK, so a flush reads no payload. A cached failure
(a negative key) cannot be invalidated: the resolver gives those group SETATTR as well, and root
makes them expire instead (contract.ADMIN_NEGATIVE_KEY_PERM). Every serial comes from a line of
/proc/keys that the kernel's keyctl_describe confirms (kmskeys/prockeys.py): a user can forge
lines there, never make root act on a key the line does not truly describe.

The host cache (resolver/hostcache.py) is a keyring under root's persistent keyring: root
reaches it as its possessor and invalidates the entries of the name.

Before any of that, the flush epoch of every install routing the prefix changes
(kmskeys/flushepoch.py): a miss already running then resolves again instead of landing the value
it read before the flush.
"""

from __future__ import annotations

import errno
import grp
import time
from dataclasses import dataclass
from pathlib import Path

from kmskeys import keyutils, prockeys
from kmskeys.contract import (
    ADMIN_GROUP,
    DEFAULT_STATE_DIR,
    HOSTCACHE_ENTRY_PREFIX,
    HOSTCACHE_KEYRING,
    HOSTCACHE_KEYRING_PERM,
    hostcache_entry,
)
from kmskeys.errors import KeyctlError
from kmskeys.prockeys import ProcKey

# The key GC unlinks an invalidated key from every keyring in a work item queued at once; until
# it has, a search meets the invalidated key and request_key fails with EKEYREVOKED instead of
# asking the resolver. The flush waits that long (milliseconds measured) so that the next
# request of every user re-resolves.
GC_WAIT = 2.0
_GC_POLL = 0.005
_ABSENT = (errno.ENOKEY, errno.EKEYEXPIRED, errno.EKEYREVOKED)


@dataclass(frozen=True)
class Flushed:
    """What a host-wide flush did."""

    keys: int  # kernel keys of any uid invalidated
    uids: int  # how many uids the keys and negative keys belonged to
    entries: int  # host-cache entries invalidated
    lingering: int  # invalidated keys the key GC had not removed after GC_WAIT
    negative: int = 0  # cached failures (negative keys) of any uid made to expire


# How long the flush of this process's own keys waits for a key under construction.
OWN_FLUSH_WAIT = 0.5


def invalidate_each(serials: list[int], wait: float) -> dict[int, bool | None]:
    """Invalidate each key, in a thread of its own: True invalidated, False refused, None
    still waiting after `wait` s (the kernel waits for a key under construction to be answered
    before it invalidates it; the thread goes on, and dies with the process)."""
    import threading

    results: dict[int, bool] = {}

    def run(serial: int) -> None:
        try:
            keyutils.keyctl_invalidate(serial)
            results[serial] = True
        except KeyctlError:
            results[serial] = False

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in serials]
    for thread in threads:
        thread.start()
    until = time.monotonic() + wait
    for thread in threads:
        thread.join(max(0.0, until - time.monotonic()))
    return {serial: results.get(serial) for serial in serials}


def admin_gid() -> int | None:
    """The gid of ADMIN_GROUP, or None if this host has no such group (install creates it)."""
    try:
        return grp.getgrnam(ADMIN_GROUP).gr_gid
    except KeyError:
        return None


def host_cache_ring(create: bool, holder: int = keyutils.KEY_SPEC_PROCESS_KEYRING) -> int | None:
    """The host cache's keyring (root only), created if asked; None if it does not exist.

    Root's persistent keyring is linked into `holder` (this process's keyring by default), so
    that we possess it and what it holds: never a session keyring, which other processes share.
    """
    # KEYCTL_GET_PERSISTENT also restarts the keyring's expiry timer
    # (/proc/sys/kernel/keys/persistent_keyring_expiry, 3 days by default).
    persistent = keyutils.keyctl_get_persistent(-1, holder)
    try:
        return keyutils.keyctl_search(persistent, b"keyring", HOSTCACHE_KEYRING.encode(), 0)
    except KeyctlError as exc:
        if exc.errno not in _ABSENT:
            raise
        if not create:
            return None
    # Two handlers may both create it: the later link displaces the earlier keyring, which only
    # loses what was cached in it.
    ring = keyutils.add_key(b"keyring", HOSTCACHE_KEYRING.encode(), b"", persistent)
    keyutils.keyctl_setperm(ring, HOSTCACHE_KEYRING_PERM)
    return ring


def covers(flushed: str, desc: str) -> bool:
    """True if flushing the description `flushed` reaches the key described `desc`: the same
    description, or, for `PREFIX:NAME` without a selector, every `PREFIX:NAME#SELECTOR` too
    (`sm:prod/db` reaches `sm:prod/db#password`; `#` is outside the name alphabet, so
    `kms:a` never reaches `kms:ab`)."""
    return desc == flushed or ("#" not in flushed and desc.startswith(flushed + "#"))


def _matches(desc: str, prefix: str | None, name: str | None) -> bool:
    if prefix is None:
        return True
    if name is None:
        return desc.startswith(prefix + ":")
    return covers(f"{prefix}:{name}", desc)


def flush_host(prefix: str | None, name: str | None) -> Flushed:
    """Invalidate every cached `prefix:name` key of every uid (a name without a selector: its
    selectors' keys too, `covers`) and expire its cached failures, and invalidate the host-cache
    entries of that name; name None: every key under `prefix:`; prefix None (and name None):
    every key the resolver made, and the whole host cache. Root."""
    if prefix is None and name is not None:
        raise ValueError("a name needs its prefix")
    # In a thread of its own: the fsgid is per thread, and the persistent keyring is linked into
    # that thread's keyring, which goes with the thread (the caller gets no process keyring).
    import threading

    outcome: list[Flushed | BaseException] = []

    def run() -> None:
        try:
            outcome.append(_flush_host(prefix, name))
        except BaseException as exc:  # re-raised in the caller's thread
            outcome.append(exc)

    # First: a miss in flight that answers after this sees the change (flushepoch's order).
    bump_epochs(prefix, name)
    worker = threading.Thread(target=run, name="kmskeys-flush")
    worker.start()
    worker.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def bump_epochs(prefix: str | None, name: str | None) -> list[Path]:
    """Change the flush epoch in the state_dir of every rule routing `prefix` (every kmskeys
    rule when None); the state_dirs it changed."""
    from kmskeys import flushepoch
    from kmskeys.rules import installed_rules

    dirs: list[Path] = []
    for rule in installed_rules():
        if prefix is not None and rule.prefix != prefix:
            continue
        # A rule without the gate (an older install) uses the default state_dir.
        state_dir = rule.state_dir or Path(DEFAULT_STATE_DIR)
        if state_dir not in dirs:
            flushepoch.bump(state_dir, prefix, name)
            dirs.append(state_dir)
    return dirs


def _flush_host(prefix: str | None, name: str | None) -> Flushed:
    gid = admin_gid()
    invalidated: set[int] = set()
    expired: set[int] = set()
    uids: set[int] = set()
    lingering = 0
    if gid is not None:
        previous = keyutils.set_fsgid(gid)
        try:
            if keyutils.current_fsgid() != gid:
                raise PermissionError(f"cannot take group {ADMIN_GROUP} (gid {gid}): not root?")

            def wanted(key: ProcKey) -> bool:
                # Only keys the resolver made carry the admin gid. Each line is confirmed by
                # keyctl_describe (kmskeys/prockeys.py): a forged one names no key to act on.
                return (
                    key.gid == gid
                    and key.type == "user"
                    and _matches(key.description, prefix, name)
                )

            for key in prockeys.keys(wanted).values():
                outcome = _invalidate_or_expire(key.serial)
                if outcome is None:
                    continue
                (invalidated if outcome else expired).add(key.serial)
                uids.add(key.uid)
            lingering = _wait(invalidated, expired)
        finally:
            keyutils.set_fsgid(previous)
    entries = _flush_entries(prefix, name)
    return Flushed(len(invalidated), len(uids), entries, lingering, len(expired))


def _invalidate_or_expire(serial: int) -> bool | None:
    """Invalidate the key (True), or make a negative key expire (False); None: neither."""
    try:
        keyutils.keyctl_invalidate(serial)
        return True
    except KeyctlError as exc:
        if exc.errno in (errno.EACCES, errno.EKEYEXPIRED, errno.EKEYREVOKED):
            return None  # not ours to flush, or expired or invalidated meanwhile
    # A negative key answers every lookup but unlink's and setattr's with its rejection errno,
    # so it cannot be invalidated; the admin group's SETATTR lets root expire it
    # (contract.ADMIN_NEGATIVE_KEY_PERM), and request_key's search skips an expired key.
    try:
        keyutils.keyctl_set_timeout(serial, 1)
    except KeyctlError:
        return None
    return False


def _wait(invalidated: set[int], expired: set[int]) -> int:
    """Wait (at most GC_WAIT) until the key GC has removed the invalidated keys and the expiry
    of the negative ones has passed; how many invalidated keys are still there."""
    # Presence is read from unconfirmed lines (an invalidated key can no longer be described):
    # a forged line can only make this wait longer, never make anything act.
    deadline = time.monotonic() + GC_WAIT
    while invalidated or expired:
        present = {key.serial: key.expiry for key in prockeys.lines()}
        invalidated &= present.keys()
        expired = {s for s in expired if present.get(s, "expd") != "expd"}
        if not (invalidated or expired) or time.monotonic() >= deadline:
            break
        time.sleep(_GC_POLL)
    return len(invalidated)


def _flush_entries(prefix: str | None, name: str | None) -> int:
    ring = host_cache_ring(create=False, holder=keyutils.KEY_SPEC_THREAD_KEYRING)
    if ring is None:
        return 0
    if prefix is None:
        head = HOSTCACHE_ENTRY_PREFIX
    elif name is None:
        head = f"{HOSTCACHE_ENTRY_PREFIX}{prefix}:"
    else:
        # One entry serves every selector of a name (resolver/awssource.py): flush the name's.
        head = hostcache_entry(prefix, name.partition("#")[0])
    count = 0
    for serial in memoryview(keyutils.keyctl_read(ring)).cast("i").tolist():
        try:
            desc = keyutils.keyctl_describe_alloc(serial).split(b";", 4)[4].decode()
        except (KeyctlError, IndexError, UnicodeDecodeError):
            continue
        if desc.startswith(head):
            try:
                keyutils.keyctl_invalidate(serial)
            except KeyctlError:
                continue
            count += 1
    return count
