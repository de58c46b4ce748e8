"""Which of the secrets a running command was given have changed: the detector of `exec --watch`.

Cheap when nothing happens: each resolved secret is watched through the serial of its kernel
key, with one keyctl_describe per poll, which no KMS call, upcall or payload read follows. The
resolver grants no one WRITE on a key it makes (kmskeys.contract.RESOLVED_KEY_PERM), so a
payload never changes under a serial: while the key answers, the value is the one the command
has. A key that is invalidated (a flush, the host-wide one included), revoked or expired stops
answering, and only then is the secret resolved again, through get_secret, like any request.

Kernel key notifications (KEYCTL_WATCH_KEY over a watch_queue pipe, CONFIG_KEY_NOTIFICATIONS)
would wake the watch at once instead of at the next poll, but a kernel without CONFIG_WATCH_QUEUE
(this project's CI kernel among them: pipe2(O_NOTIFICATION_PIPE) fails with ENOPKG) has none,
and the poll is needed for expiry anyway, which is never notified. So the watch polls.

The watch keeps no secret: it compares values by a BLAKE2b digest keyed with a random key of
this process, and hands each new value to its caller, which writes it where it goes and drops it.
"""

from __future__ import annotations

import errno
import hashlib
import random
import secrets
from dataclasses import dataclass

from kmskeys import get_secret
from kmskeys.errors import KeyNotFoundError, KeyRejectedError
from kmskeys.key import Key
from kmskeys.secretref import described

# Retries of a secret that could not be resolved again: the first after BACKOFF_FIRST seconds,
# each later one twice as late, up to BACKOFF_MAX, each +-BACKOFF_JITTER at random so that the
# watches of a host do not retry in step.
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 60.0
BACKOFF_JITTER = 0.2
# The resolver's definitive answers (docs/design.md, "Errors to the requester"): the secret is
# unknown, or refused to this user. Every other failure may pass (EAGAIN, a full quota, ...).
# One such answer is not enough: request_key also fails with ENOKEY when the key it had made is
# invalidated before the handler exits (a flush racing the re-resolution), which leaves nothing
# cached. So the watch asks again at once: a real refusal answers the same, from the negative
# key the kernel cached for it (no upcall); the race, with the value.
WITHDRAWN = (KeyRejectedError, KeyNotFoundError)
RECHECK = 0.05
# A key that changed between get_secret and the look-up of its serial is looked up again.
_LOCATE_TRIES = 3


@dataclass
class Watched:
    """One secret the command was given."""

    name: str
    desc: str
    serial: int | None = None  # the key polled; None: resolve again when retry_at is due
    current: bytes = b""  # digest of the newest value resolved
    applied: bytes = b""  # digest of the value the command has
    retry_at: float = 0.0
    failures: int = 0
    refused: bool = False  # the last answer was a refusal: one more makes it definitive
    error: BaseException | None = None  # the last failure, while there is one


@dataclass(frozen=True)
class Outcome:
    """What resolving a secret again found: `same` or `changed` value (since the last
    resolution), `failed` (may pass: retried), `recheck` (a first refusal: asked again at once)
    or `withdrawn` (the resolver's no, given twice)."""

    kind: str
    value: bytes | None = None  # for `same` and `changed`: the caller uses it and drops it
    error: BaseException | None = None
    retry_in: float = 0.0  # for `failed` and `withdrawn`: seconds to the next attempt


class SecretWatch:
    """The secrets of one command, by name, each with its serial and value digests."""

    def __init__(self, names: list[str], prefix: str, keyring: str | None) -> None:
        self.prefix = prefix
        self.keyring = keyring
        self.secrets = {name: Watched(name, described(name, prefix)) for name in names}
        self._key = secrets.token_bytes(32)
        self._fsuid = _fsuid()

    def digest(self, value: bytes) -> bytes:
        """The keyed digest the watch compares values by."""
        return hashlib.blake2b(value, key=self._key, digest_size=32).digest()

    def adopt(self, name: str, value: bytes, now: float) -> None:
        """Start watching `name`, whose value the command is given; find its key's serial."""
        watched = self.secrets[name]
        watched.current = watched.applied = self.digest(value)
        watched.serial = self._locate(watched, watched.current)
        if watched.serial is None:
            watched.retry_at = now  # changed meanwhile, or out of reach: resolve again at once

    def poll(self, now: float) -> None:
        """Describe each watched key; a key that no longer answers is resolved again now."""
        for watched in self.secrets.values():
            if watched.serial is not None and not self._alive(watched, watched.serial):
                watched.serial = None
                watched.retry_at = now

    def due(self, now: float) -> list[str]:
        """Names to resolve again now: their key is gone, or a retry is due."""
        return [w.name for w in self.secrets.values() if w.serial is None and w.retry_at <= now]

    def next_retry(self) -> float | None:
        """When the next resolution is due, if any is."""
        times = [w.retry_at for w in self.secrets.values() if w.serial is None]
        return min(times) if times else None

    def refresh(self, name: str, now: float) -> Outcome:
        """Resolve `name` again (get_secret: the kernel cache, else one upcall) and compare."""
        watched = self.secrets[name]
        before = watched.current
        try:
            value = self.resolve(name)
        except WITHDRAWN as exc:
            if not watched.refused:
                watched.refused, watched.serial, watched.retry_at = True, None, now + RECHECK
                return Outcome("recheck", error=exc, retry_in=RECHECK)
            return Outcome("withdrawn", error=exc, retry_in=self._failed(watched, exc, now))
        except Exception as exc:  # every failure is retried; none is fatal
            return Outcome("failed", error=exc, retry_in=self._failed(watched, exc, now))
        changed = watched.current != before
        watched.error, watched.refused = None, False
        if watched.serial is None:
            self._backoff(watched, now)  # resolved, but its key could not be confirmed: again
        else:
            watched.failures = 0
        return Outcome("changed" if changed else "same", value=value)

    def resolve(self, name: str) -> bytes:
        """The value of `name` now, through get_secret; records its serial and digest."""
        watched = self.secrets[name]
        for _ in range(_LOCATE_TRIES):
            value = get_secret(name, prefix=self.prefix, keyring=self.keyring)
            digest = self.digest(value)
            serial = self._locate(watched, digest)
            if serial is not None:
                watched.serial, watched.current = serial, digest
                return value
        # The key keeps changing under us (or is out of this process's search): keep the value,
        # and resolve again at the next retry rather than watch a key we could not confirm.
        watched.serial, watched.current = None, digest
        return value

    def pending(self) -> list[str]:
        """Names whose newest value the command does not have yet."""
        return [w.name for w in self.secrets.values() if w.current != w.applied]

    def applied(self, names: list[str] | None = None) -> None:
        """Record that the command now has the newest value of `names` (default: all)."""
        for name in self.secrets if names is None else names:
            watched = self.secrets[name]
            watched.applied = watched.current

    def _failed(self, watched: Watched, exc: BaseException, now: float) -> float:
        watched.serial, watched.error = None, exc
        watched.refused = isinstance(exc, WITHDRAWN)
        return self._backoff(watched, now)

    def _backoff(self, watched: Watched, now: float) -> float:
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** min(watched.failures, 16))
        watched.failures += 1
        delay *= random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)  # noqa: S311 - spread only
        watched.retry_at = now + delay
        return delay

    def _locate(self, watched: Watched, digest: bytes) -> int | None:
        # The key get_secret found, by a search of this process's keyrings (no upcall), confirmed
        # as ours (type, description, owner: what get_secret checks) and holding this value.
        try:
            key = Key.request(watched.desc)
            if not self._alive(watched, key.serial):
                return None
            return key.serial if self.digest(key.read()) == digest else None
        except OSError:
            return None

    def _alive(self, watched: Watched, serial: int) -> bool:
        # keyctl_describe fails for a key that is invalidated (ENOKEY), revoked, expired or gone;
        # a serial the kernel reused for another key fails the description or owner check.
        try:
            found = Key(serial).describe()
        except OSError:
            return False
        return (found.type, found.description, found.uid) == ("user", watched.desc, self._fsuid)


def _fsuid() -> int:
    # Key permissions and get_secret's owner check go by the fsuid (docs/design.md); /proc says
    # it without a call into the keyutils binding: "Uid: real effective saved filesystem".
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Uid:"):
                return int(line.split()[4])
    raise OSError(errno.ENOENT, "no Uid: line in /proc/self/status")
