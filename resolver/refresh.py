"""`kmskeys-resolver refresh`: refresh-ahead, so that no app ever meets a miss.

Without it, a key expires and the next read pays a miss (a handler run, maybe a KMS call, or a
refusal while KMS is down). The refresher renews every key the resolver answered
(resolver/keyrecords.py) shortly before it expires, **in place**: it resolves the very request
again on the key owner's behalf (resolver/pipeline.py: the same policy, blob checks, host cache,
budget and stale answers as a miss) and then, as root, KEYCTL_UPDATE puts the payload into the
same key and KEYCTL_SET_TIMEOUT gives it a new timeout. The serial does not change and the key
never disappears, so a reader never notices. Root may do that through the member-less admin
group's WRITE|SETATTR bits (kmskeys/contract.py ADMIN_GROUP_PERM, which says why they give
nobody else anything): a worker thread takes the group as its fsgid, and a fsuid other than the
key's owner, for the moment it acts.

- A key no longer linked anywhere (its keyring is gone), expired, flushed or changed is skipped
  and forgotten: keyctl_describe must show a `user` key of the recorded owner, the admin group
  and the description asked for, before the update and again after it.
- A name whose policy now refuses it, or whose blob or secret is gone, is not renewed: the key
  expires as it would have without refresh-ahead, and the record is forgotten.
- While KMS is unavailable, a stale host-cache entry renews the key with `stale_ttl`, exactly as
  a miss would be answered; with nothing to answer, it is retried until the key expires.
- One KMS call per host per blob and ttl: the refresh goes through the host cache.
- The owner's budget: every AWS call spends the owner's (charged uid's) token bucket.
- Jitter: a key is renewed at a random moment of the last part of its life (`due_after`).

Run it as the service `kmskeys-refresh.service` (resolver/data), a long-running loop: keys expire
every ttl at their own moments, and the loop sleeps until the next one is due, with one process
and its imports for all of them. `run(config, stop)` is the same loop for a thread of a
long-running process. One refresher per state_dir runs at a time (a lock file);
a second waits. `--once` renews every recorded key now and exits (tests, and by hand).
"""

from __future__ import annotations

import fcntl
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kmskeys import keyutils
from kmskeys.contract import ERRNO_UNAVAILABLE
from kmskeys.errors import KmsKeysError
from kmskeys.hostflush import admin_gid
from resolver import keyrecords, pipeline
from resolver.answer import flushed, log_writer
from resolver.awsclient import keep_clients, warm_clients
from resolver.hostcache import boottime
from resolver.keyrecords import RENEWABLE, Record
from resolver.limits import open_state_file
from resolver.log import LOG_INFO, LOG_WARNING, SyslogWriter, format_fields

if TYPE_CHECKING:
    from resolver.config import Config

WORKERS = 4  # refreshes at once: a hung KMS call must not hold up every other key
SCAN_INTERVAL = 1.0  # seconds between looks for keys answered meanwhile
LEAD_FRACTION = 0.2
RETRY_AFTER = 2.0  # seconds before a refresh that found KMS unavailable is tried again
# The fsuid root takes to renew a key uid 0 owns (the owner's bits, without WRITE, would apply
# to fsuid 0); any uid but the owner's does, this one is the kernel's overflow uid.
NOT_OWNER = 65534
LOCK_FILE = "refresher.lock"
REFRESH = "refresh"
VIA = f" via={REFRESH}"


def due_after(answered: float, timeout: int, deadline: float) -> float:
    """When (CLOCK_BOOTTIME) to renew a key given `timeout` s at `answered`.

    A timeout of T lasts at least T - 1 s (expiry is in whole seconds). The refresh starts
    `lead` before that: a fifth of the key's life, at least the handler's `deadline` (the time
    a refresh may take when KMS hangs and no stale entry is at hand), at most half its life;
    minus a random part of up to half the lead, so that keys made together do not stay
    together. ttl 300 s: between 209 and 239 s; ttl 4 s: between 0.75 and 1.5 s.
    """
    life = max(0.0, timeout - 1.0)
    lead = min(life / 2, max(life * LEAD_FRACTION, deadline))
    return answered + life - lead - random.uniform(0.0, lead / 2)  # noqa: S311 (spread, no secret)


@contextmanager
def acting_as_admin(owner: int, gid: int) -> Iterator[None]:
    """This thread checks key permissions with the admin group `gid` and a fsuid that is not
    `owner`'s, for the block (fsuid and fsgid are per thread)."""
    fsuid = 0 if owner != 0 else NOT_OWNER
    previous_gid = keyutils.set_fsgid(gid)
    previous_uid = keyutils.set_fsuid(fsuid)
    try:
        if keyutils.current_fsgid() != gid or keyutils.current_fsuid() != fsuid:
            raise PermissionError("cannot take the kmskeys-admin group: not root?")
        yield
    finally:
        keyutils.set_fsuid(previous_uid)
        keyutils.set_fsgid(previous_gid)


def is_recorded_key(record: Record, gid: int) -> bool:
    """Whether `record.serial` is still the key recorded: type, owner, group, a renewable mask
    and the description (a serial the kernel gave a new key is none of ours)."""
    try:
        described = keyutils.keyctl_describe_alloc(record.serial).decode().split(";", 4)
    except (KmsKeysError, UnicodeDecodeError):
        return False
    if len(described) != 5:
        return False
    kind, uid, group, perm, desc = described
    return (
        kind == "user"
        and uid == str(record.uid)
        and group == str(gid)
        and int(perm, 16) & RENEWABLE == RENEWABLE
        and desc == record.description
    )


def renew(record: Record, payload: bytes, timeout: int, gid: int) -> bool:
    """Update the key in place and give it `timeout`; False if it is not the recorded key."""
    with acting_as_admin(record.uid, gid):
        if not is_recorded_key(record, gid):
            return False
        keyutils.keyctl_update(record.serial, payload)
        keyutils.keyctl_set_timeout(record.serial, timeout)
        if not is_recorded_key(record, gid):
            # Died and reused between the check and the update: never leave another's payload.
            keyutils.keyctl_invalidate(record.serial)
            return False
    return True


def refresh_key(config: Config, record: Record, log: SyslogWriter) -> tuple[str, float | None]:
    """Renew one key: what happened, and when to try next (None: forget it)."""
    gid = admin_gid()
    if gid is None:
        return "not renewed: the kmskeys-admin group is gone", None
    with acting_as_admin(record.uid, gid):
        alive = is_recorded_key(record, gid)
    if not alive:
        return "forgotten: the key is gone (its keyring, expiry or a flush)", None
    started = time.monotonic()
    asked = pipeline.KernelRequest(
        record.serial, record.description, record.uid, record.gid, callout=record.callout
    )
    outcome = pipeline.resolve(asked, config, started + config.deadline, via=REFRESH)
    if outcome.answered and flushed(outcome):
        # Root flushed it meanwhile: the flush invalidates the key; never renew it with this.
        return "not renewed: flushed while resolving", None
    if outcome.answered:
        try:
            renewed = renew(record, outcome.payload, outcome.timeout, gid)
        except KmsKeysError as exc:
            return f"forgotten: the update failed ({exc})", None
        if not renewed:
            return "forgotten: the key is gone (its keyring, expiry or a flush)", None
        log.emit(outcome.severity, outcome.line(_ms(started)) + VIA)
        return f"renewed (ttl {outcome.timeout})", due_after(
            boottime(), outcome.timeout, config.deadline
        )
    log.emit(outcome.severity, outcome.line(_ms(started)) + VIA)
    if outcome.errno == ERRNO_UNAVAILABLE:
        # Tried again until it works or the key is gone, spread like the first try.
        retry = boottime() + RETRY_AFTER * random.uniform(0.5, 1.0)  # noqa: S311
        return f"not renewed yet ({outcome.reason})", retry
    return f"not renewed, it expires as it would have ({outcome.reason})", None


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


class Known:
    """A recorded key, as the loop schedules it."""

    __slots__ = ("busy", "due", "record")

    def __init__(self, record: Record, due: float) -> None:
        self.record, self.due, self.busy = record, due, False


class Refresher:
    """The loop's state: the recorded keys it knows of, and when each is due."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = log_writer(config)
        self.known: dict[tuple[int, int], Known] = {}
        self.guard = threading.Lock()

    def scan(self) -> None:
        """Learn the keys recorded since the last scan; drop those whose record went."""
        config = self.config
        listed = keyrecords.listing(config)
        present = {(charged, serial) for charged, serials in listed.items() for serial in serials}
        with self.guard:
            for key in [k for k, known in self.known.items() if k not in present]:
                if not self.known[key].busy:
                    del self.known[key]
            fresh = present - self.known.keys()
        for charged, serial in fresh:
            record = keyrecords.load(config, charged, serial)
            if record is None:
                continue
            due = due_after(record.answered, record.timeout, config.deadline)
            with self.guard:
                self.known.setdefault((charged, serial), Known(record, due))

    def take_due(self, now: float, every: bool = False) -> list[Known]:
        """The keys due at `now` (all with `every`), marked busy."""
        with self.guard:
            due = [k for k in self.known.values() if not k.busy and (every or k.due <= now)]
            for known in due:
                known.busy = True
        return due

    def next_due(self, default: float) -> float:
        """When the next key is due, or `default`."""
        with self.guard:
            return min((k.due for k in self.known.values() if not k.busy), default=default)

    def one(self, known: Known) -> str:
        """Renew one key and reschedule or forget it; what happened."""
        record = known.record
        try:
            what, due = refresh_key(self.config, record, self.log)
        except Exception as exc:  # a bug must not stop the loop: say so, try again later
            what, due = f"internal error: {type(exc).__name__}", boottime() + RETRY_AFTER
            self.log.emit(LOG_WARNING, format_fields(key=record.serial, reason=what) + VIA)
        with self.guard:
            if due is None:
                keyrecords.forget(self.config, record.charged, record.serial)
                self.known.pop((record.charged, record.serial), None)
            else:
                known.due, known.busy = due, False
        return what


def run(config: Config, stop: threading.Event) -> None:
    """The refresh-ahead loop until `stop` is set (`kmskeys-resolver refresh`, or a thread)."""
    lock = _exclusive(config, stop)
    if lock is None:
        return
    # One client per service and region for the loop's lifetime, as the resolver daemon keeps
    # its own: a client built per renewal costs 0.1-0.25 s (and botocore's import the first
    # time), against a lead of about a second before a short-lived key expires.
    keep_clients()
    warm_clients(config)
    refresher = Refresher(config)
    refresher.scan()
    started = format_fields(config=config.path, refresh="running", keys=len(refresher.known))
    refresher.log.emit(LOG_INFO, started)
    try:
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="kmskeys-refresh") as pool:
            while not stop.is_set():
                refresher.scan()
                now = boottime()
                for known in refresher.take_due(now):
                    pool.submit(refresher.one, known)
                wake = min(refresher.next_due(now + SCAN_INTERVAL), now + SCAN_INTERVAL)
                stop.wait(max(0.02, wake - boottime()))
    finally:
        os.close(lock)
        refresher.log.emit(LOG_INFO, format_fields(config=config.path, refresh="stopped"))


def once(config: Config) -> list[tuple[Record, str]]:
    """Renew every recorded key now: (record, what happened) for each."""
    refresher = Refresher(config)
    refresher.scan()
    due = refresher.take_due(boottime(), every=True)
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="kmskeys-refresh") as pool:
        done = list(pool.map(refresher.one, due))
    return [(known.record, what) for known, what in zip(due, done, strict=True)]


def start_thread(config: Config) -> tuple[threading.Thread, threading.Event]:
    """The loop in a thread of this process; set the event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(config, stop), name="kmskeys-refresh", daemon=True)
    thread.start()
    return thread, stop


def _exclusive(config: Config, stop: threading.Event) -> int | None:
    """The refresher lock of state_dir (one loop per host and config), waiting for it until
    `stop`; None if stopped first."""
    fd = open_state_file(config.state_dir, LOCK_FILE)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if stop.wait(SCAN_INTERVAL):
                os.close(fd)
                return None
