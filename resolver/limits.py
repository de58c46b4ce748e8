"""Per-uid limits, checked before any expensive work: one uid must not starve the others.

Every miss of every local user runs a root handler, and every handler may call KMS. Two limits,
both shared by all handler processes (and the warm daemon) through lock files in the config's
root-only `state_dir` (a tmpfs, /run/kmskeys, by default):

- at most `max_concurrent_per_uid` handler runs per requesting uid at once: a slot is an
  flock(2) on one of that many files, held until the handler exits (the kernel drops it even
  when the process is killed). A request that finds every slot taken gets EAGAIN at once,
  before anything is imported or decrypted;
- a token bucket of `kms_burst_per_uid` tokens refilled at `kms_rate_per_uid` per second: each
  AWS call made for the uid's request (KMS Decrypt, the keystore seal, retries included) takes
  one, so no uid can burn the account's request quota. The budgets are spent by the AWS
  gateway (resolver/gateway.py); prefetch has a bucket of its own.

Per-uid means per charged uid (`charged_uid`): a uid inside a subordinate range of /etc/subuid
(a rootless container's) spends its range owner's limits, so a user with 65536 subuids gets one
share, not 65536. The host cache's charges and refresh-ahead's records count the same way.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kmskeys import fileio
from kmskeys.contract import BUILD_STAMP
from resolver.errors import ConfigError, UnavailableError
from resolver.log import LOG_WARNING, format_fields

if TYPE_CHECKING:
    from resolver.config import Config

# kmskeys-gate (resolver/gate.c) takes the slot before Python starts and passes the locked fd
# in this variable (KMSKEYS_SLOT_FD_ENV in kmskeys/contract.h). request-key runs with the
# kernel's fixed environment, so no requester can set it.
SLOT_FD_ENV = "KMSKEYS_SLOT_FD"
# ... and its build stamp in this one: a gate built from other sources is refused, loudly.
GATE_STAMP_ENV = "KMSKEYS_GATE_STAMP"
# A uid's slots are the files SLOT_PREFIX + "UID-INDEX" in state_dir (the gate's too).
SLOT_PREFIX = "slot-"
# A uid's background host-cache refreshes (resolver/cachedfetch.py) hold these instead: they
# must not take the slots its requests need.
BACKGROUND_PREFIX = "bgslot-"
# A bucket file holds (tokens, CLOCK_MONOTONIC seconds of the last refill): the clock is the
# same for every process on the host, and /run starts empty at boot.
_BUCKET = struct.Struct("=dd")
# The bucket of `kmskeys-resolver prefetch`: never a uid's (a root service's next miss must
# not find uid 0's bucket spent by a prefetch).
PREFETCH_BUCKET = "prefetch"


def _state_dir(path: Path) -> int:
    """An fd of the state directory, created root-only if missing; refused if unsafe."""
    try:
        return fileio.open_dir(path, f"state_dir {path}", fileio.CREATE | fileio.PRIVATE)
    except fileio.UntrustedFileError as exc:
        raise ConfigError(str(exc), refusal=exc) from None
    except OSError as exc:
        raise ConfigError(f"state_dir {path}: {exc.strerror}") from None


def _open(dir_fd: int, name: str) -> int:
    try:
        flags = fileio.WRITE | fileio.CREATE
        return fileio.open_file(name, f"state file {name}", flags, dir_fd=dir_fd)
    except fileio.UntrustedFileError as exc:
        raise ConfigError(str(exc), refusal=exc) from None


def open_state_file(state_dir: Path, name: str) -> int:
    """An fd of the root-only lock file `name` in state_dir, created if missing."""
    dir_fd = _state_dir(state_dir)
    try:
        return _open(dir_fd, name)
    finally:
        os.close(dir_fd)


def acquire_slot(state_dir: Path, uid: int, slots: int, prefix: str = SLOT_PREFIX) -> int | None:
    """An fd holding one of `uid`'s `slots` handler slots (keep it open), or None if all are
    taken; `prefix` names another kind of slot (BACKGROUND_PREFIX)."""
    dir_fd = _state_dir(state_dir)
    try:
        for index in range(slots):
            fd = _open(dir_fd, f"{prefix}{uid}-{index}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None
    finally:
        os.close(dir_fd)


def take_token(state_dir: Path, bucket: str, rate: float, burst: int) -> bool:
    """Take one token from the bucket `bucket` (a uid, or prefetch); False when it is empty."""
    dir_fd = _state_dir(state_dir)
    try:
        fd = _open(dir_fd, f"bucket-{bucket}")
    finally:
        os.close(dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a read and a write, microseconds
        now = time.monotonic()
        raw = os.pread(fd, _BUCKET.size, 0)
        tokens, then = _BUCKET.unpack(raw) if len(raw) == _BUCKET.size else (float(burst), now)
        if not 0 <= tokens <= burst or then > now:
            tokens, then = float(burst), now  # garbled, or from before a reboot: start full
        tokens = min(float(burst), tokens + (now - then) * rate)
        taken = bool(tokens >= 1)
        os.pwrite(fd, _BUCKET.pack(tokens - 1 if taken else tokens, now), 0)
        return taken
    finally:
        os.close(fd)


class UidBudget:
    """The requester's AWS calls: its uid's token bucket (kms_rate_per_uid, kms_burst_per_uid).

    Every call the resolver makes for a request spends it, whatever the backend: KMS Decrypt,
    the keystore seal's Encrypt and Decrypt, retries and fallback regions included.
    """

    def __init__(self, config: Config, uid: int) -> None:
        self.config = config
        self.uid = uid

    def spend(self) -> None:
        """Take a token of the charged uid's bucket, or refuse for now (EAGAIN)."""
        config = self.config
        charged = charged_uid(config, self.uid)
        if not take_token(
            config.state_dir, str(charged), config.kms_rate_per_uid, config.kms_burst_per_uid
        ):
            whose = f"uid {self.uid}" + (
                f" (charged to uid {charged}, /etc/subuid)" if charged != self.uid else ""
            )
            raise UnavailableError(
                f"{whose} is over its KMS call rate (kms_rate_per_uid "
                f"{config.kms_rate_per_uid:g}/s, burst {config.kms_burst_per_uid})"
            )


class PrefetchBudget:
    """Prefetch's calls: a bucket of its own, with a uid's rate and burst."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def spend(self) -> None:
        """Take a token, or refuse for now (EAGAIN)."""
        config = self.config
        if not take_token(
            config.state_dir, PREFETCH_BUCKET, config.kms_rate_per_uid, config.kms_burst_per_uid
        ):
            raise UnavailableError(
                f"prefetch is over its call rate (kms_rate_per_uid {config.kms_rate_per_uid:g}/s, "
                f"burst {config.kms_burst_per_uid}, a bucket of its own)"
            )


def stale_gate() -> str | None:
    """Why the kmskeys-gate that ran before this handler is not of this build, or None.

    The gate sets GATE_STAMP_ENV to the stamp compiled into it (kmskeys/contract.h); a gate
    from before stamps passes a slot without one. No gate at all (a rule without it) is fine.
    """
    stamp = os.environ.pop(GATE_STAMP_ENV, None)
    if (stamp is None and SLOT_FD_ENV not in os.environ) or stamp == BUILD_STAMP:
        return None
    return (
        f"kmskeys-gate was built from other sources (stamp {stamp or 'none'}, this resolver "
        f"{BUILD_STAMP}): reinstall kmskeys, then run kmskeys-resolver install"
    )


def inherited_slot(state_dir: Path, uid: int, slots: int) -> tuple[int | None, bool]:
    """(fd, allowed) for the slot kmskeys-gate took for `uid`; (None, True) if it took none.

    `allowed` is False when the gate's slot is not one this config allows (a rule installed
    before max_concurrent_per_uid was lowered): the request is then answered as busy. A slot in
    another directory (a rule installed before state_dir changed) is dropped, and the caller
    takes one the usual way.
    """
    value = os.environ.pop(SLOT_FD_ENV, None)
    if value is None:
        return None, True
    try:
        fd = int(value)
        held = os.readlink(f"/proc/self/fd/{fd}")
    except (ValueError, OSError):
        return None, True
    directory, name = os.path.split(held)
    prefix = f"{SLOT_PREFIX}{uid}-"
    if directory != os.path.realpath(state_dir) or not name.startswith(prefix):
        os.close(fd)
        return None, True
    os.set_inheritable(fd, False)  # the worker gets it through fork; nothing it execs does
    index = name[len(prefix) :]
    return fd, index.isdigit() and int(index) < slots


# --- Subordinate uid ranges ------------------------------------------------------------------
# shadow-utils' subuid(5): one `owner:start:count` per line, owner a user name or a numeric uid;
# useradd and usermod write it, newuidmap reads it to map a rootless container's uids.
SUBUID_FILE = Path("/etc/subuid")
SUBUID_MAX_BYTES = 1 << 20
# An unsafe /etc/subuid is logged at most once per this many seconds (a line per miss would
# flood the log): the stamp of the last line is kept in state_dir.
SUBUID_WARN_EVERY = 3600.0
_SUBUID_WARNED = "subuid-warned"
# The (dev, ino, size, mtime_ns) of the file last parsed -> its ranges: one parse per process.
_PARSED: dict[tuple[int, int, int, int], tuple[tuple[int, int, str], ...]] = {}


def charged_uid(config: Config, uid: int, subuid_file: Path = SUBUID_FILE) -> int:
    """The uid whose per-uid limits `uid` spends: the owner of the /etc/subuid range holding it.

    Exactly these semantics (resolver/gate.c implements the same for the per-uid slots):
    - off (the uid itself) when `aggregate_subuids` is false, when the file is missing, or when
      it is unsafe: not a regular root-owned file, group- or world-writable, a link, or over
      SUBUID_MAX_BYTES (that case is logged);
    - each line is `owner:start:count` (the line's surrounding whitespace ignored): start and
      count decimal, count at least 1; owner all digits is that uid, anything else a user name
      looked up with getpwnam. A line that does not parse, or whose owner has no passwd entry,
      is skipped as if absent;
    - the first line, in file order, whose [start, start + count) holds `uid` decides: the uid
      is charged to that line's owner. No line holds it: the uid itself.
    """
    if not config.aggregate_subuids:
        return uid
    for start, count, owner in _subuid_ranges(config, subuid_file):
        if start <= uid < start + count:
            found = _owner_uid(owner)
            if found is not None:
                return found
    return uid


def _owner_uid(owner: str) -> int | None:
    if owner.isascii() and owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except (KeyError, ValueError):  # no such user; a NUL in the name
        return None


def _subuid_ranges(config: Config, path: Path) -> tuple[tuple[int, int, str], ...]:
    """The (start, count, owner) of each valid line of `path`; () when missing or unsafe."""
    label = f"subordinate uid file {path}"
    try:
        fd = fileio.open_file(path, label)
    except fileio.UntrustedFileError as exc:
        if exc.problem != fileio.MISSING:
            _warn_unsafe(config, path, exc.detail)
        return ()
    try:
        st = os.fstat(fd)
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if signature in _PARSED:
            return _PARSED[signature]
        text = fileio.read_fd(fd, SUBUID_MAX_BYTES, label)
    except fileio.UntrustedFileError as exc:
        _warn_unsafe(config, path, exc.detail)
        return ()
    except OSError:
        return ()
    finally:
        os.close(fd)
    ranges = tuple(parse_subuid(text))
    _PARSED.clear()
    _PARSED[signature] = ranges
    return ranges


def parse_subuid(text: bytes) -> list[tuple[int, int, str]]:
    """The (start, count, owner) of each line of a subuid file that parses, in file order."""
    found = []
    for raw in text.decode("utf-8", "replace").splitlines():
        fields = raw.strip().split(":")
        if len(fields) != 3 or not fields[0]:
            continue
        owner, start, count = fields
        if not (start.isascii() and start.isdigit() and count.isascii() and count.isdigit()):
            continue
        if int(count) >= 1:
            found.append((int(start), int(count), owner))
    return found


def _warn_unsafe(config: Config, path: Path, why: str) -> None:
    """Log, at most once per SUBUID_WARN_EVERY seconds host-wide, that nothing is aggregated."""
    try:
        fd = open_state_file(config.state_dir, _SUBUID_WARNED)
    except ConfigError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 8, 0)
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        (last,) = struct.unpack("=d", raw) if len(raw) == 8 else (-SUBUID_WARN_EVERY,)
        if 0 <= now - last < SUBUID_WARN_EVERY:
            return
        os.pwrite(fd, struct.pack("=d", now), 0)
    finally:
        os.close(fd)
    from resolver.answer import log_writer

    reason = f"per-uid limits not aggregated over subordinate uids (aggregate_subuids): {why}"
    line = format_fields(config=config.path, subuid_file=path, reason=reason)
    log_writer(config).emit(LOG_WARNING, line)
