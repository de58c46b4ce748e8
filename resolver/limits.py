"""Per-uid limits, checked before any expensive work: one uid must not starve the others.

Every miss of every local user runs a root handler, and every handler may call KMS. Two limits,
both shared by all handler processes (and the resolver daemon) through lock files in the config's
root-only `state_dir` (a tmpfs, /run/kmskeys, by default):

- at most `max_concurrent_per_uid` handler runs per requesting uid at once: a slot is an
  flock(2) on one of that many files, held until the handler exits (the kernel drops it even
  when the process is killed). A request that finds every slot taken gets EAGAIN at once,
  before anything is imported or decrypted;
- a token bucket of `kms_burst_per_uid` tokens refilled at `kms_rate_per_uid` per second: each
  AWS call made for the uid's request (KMS Decrypt, the keystore seal, retries included) takes
  one, so no uid can burn the account's request quota. The budgets are spent by the AWS
  gateway (resolver/gateway.py); prefetch has a bucket of its own.

Per-uid means per charged uid (`charged_uid`): with `aggregate_subuids` on, a uid inside a
subordinate range of /etc/subuid (a rootless container's) spends its range owner's limits, so a
user with 65536 subuids gets one share, not 65536 (issue 20.8). kmskeys-gate charges its slots
the same way (resolver/gate_subuid.c); the host cache's charges and refresh-ahead's records
count the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kmskeys import fileio
from kmskeys.contract import BUILD_STAMP
from resolver.errors import ConfigError, UnavailableError

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
# Subordinate uid ranges (rootless containers): `OWNER:START:COUNT` lines; an owner's name is
# looked up in the passwd file (kmskeys-gate is static and loads no NSS module, so both sides
# read the files database). resolver/gate_subuid.c applies the same rules (charged_uid).
SUBUID_FILE = "/etc/subuid"
USERS_FILE = "/etc/passwd"
SUBUID_FILE_MAX = 1 << 20
SUBUID_OWNER_MAX = 256
# The gate's note in state_dir of when it last logged that /etc/subuid is unsafe (once a minute).
SUBUID_WARNED = "subuid-warned"
_UID_MAX = 0xFFFFFFFE


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


def charged_uid(config: Config, uid: int, subuid: str | os.PathLike[str] = SUBUID_FILE) -> int:
    """The uid whose per-uid limits `uid` is charged to: with `aggregate_subuids` on, the owner
    of the first range of `subuid` (/etc/subuid) that holds it and whose owner resolves, else
    `uid`. An unsafe file aggregates nothing; kmskeys-gate, which runs first, logs it."""
    if not config.aggregate_subuids:
        return uid
    owner, _ = subuid_owner(uid, os.fspath(subuid))
    return uid if owner is None else owner


def subuid_owner(
    uid: int, subuid: str = SUBUID_FILE, users: str = USERS_FILE
) -> tuple[int | None, str | None]:
    """(the owner of the first range in `subuid` holding `uid`, or None; why aggregation is off,
    or None). A file that is not root's alone turns it off; a missing one has no ranges."""
    try:
        text = fileio.read_file(subuid, SUBUID_FILE_MAX, subuid)
    except fileio.UntrustedFileError as exc:
        return None, None if exc.problem == fileio.MISSING else str(exc)
    except OSError as exc:
        return None, f"{subuid}: {exc.strerror}"
    # The gate reads the file as a C string: a NUL byte ends it there too.
    for line in text.split(b"\0", 1)[0].split(b"\n"):
        found = _range_owner(line, uid)
        if found is None:
            continue
        if isinstance(found, int):
            return found, None
        owner, problem = _user_uid(found, users)
        if problem is not None:
            return None, problem
        if owner is not None:
            return owner, None
    return None, None


def _decimal(text: bytes, limit: int) -> int | None:
    # Digits only, as gate_subuid.c reads them: no sign, space or underscore that int() allows.
    if not 0 < len(text) <= 10 or not text.isdigit() or not text.isascii():
        return None
    value = int(text)
    return value if value <= limit else None


def _range_owner(line: bytes, uid: int) -> int | bytes | None:
    """The owner (a uid, or a name to look up) of an `OWNER:START:COUNT` line holding `uid`."""
    fields = line.split(b":")
    if len(fields) != 3:
        return None
    owner, start, count = (
        fields[0],
        _decimal(fields[1], 0xFFFFFFFF),
        _decimal(fields[2], 0xFFFFFFFF),
    )
    if not 0 < len(owner) <= SUBUID_OWNER_MAX or start is None or not count:
        return None
    if not start <= uid < start + count:
        return None
    numeric = _decimal(owner, _UID_MAX)
    return numeric if numeric is not None else owner


def _user_uid(name: bytes, users: str) -> tuple[int | None, str | None]:
    """(the uid of the first passwd entry named `name`, or None; why the file is refused)."""
    try:
        text = fileio.read_file(users, SUBUID_FILE_MAX * 16, users)
    except (fileio.UntrustedFileError, OSError):
        return None, f"{users} is missing or not root's alone"
    for line in text.split(b"\n"):
        fields = line.split(b":")
        if len(fields) == 7 and fields[0] == name:
            uid = _decimal(fields[2], _UID_MAX)
            if uid is not None:
                return uid, None
    return None, None


def check_slot(fd: int, state_dir: Path, charged: int, slots: int) -> bool | None:
    """Whether the slot file open as `fd` is one of `charged`'s `slots` in state_dir: True;
    False for a slot this config no longer allows (a rule installed with more); None for a file
    that is not a slot of theirs in that directory (a rule installed with another state_dir)."""
    try:
        held = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    directory, name = os.path.split(held)
    prefix = f"{SLOT_PREFIX}{charged}-"
    if directory != os.path.realpath(state_dir) or not name.startswith(prefix):
        return None
    index = name[len(prefix) :]
    return index.isdigit() and int(index) < slots


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
    if stamp is None and SLOT_FD_ENV not in os.environ:
        return None
    return gate_stamp_problem(stamp)


def gate_stamp_problem(stamp: str | None) -> str | None:
    """Why a gate that says it is of build `stamp` is refused, or None when it is this one's."""
    if stamp == BUILD_STAMP:
        return None
    return (
        f"kmskeys-gate was built from other sources (stamp {stamp or 'none'}, this resolver "
        f"{BUILD_STAMP}): reinstall kmskeys, then run kmskeys-resolver install"
    )


def busy_reason(uid: int, charged: int, slots: int) -> str:
    """Why a request is answered EAGAIN at once: its charged uid's slots are all taken (the
    gate writes the same words, resolver/gate.c reject_busy)."""
    reason = f"uid {charged} already has {slots} requests being resolved (max_concurrent_per_uid)"
    if charged != uid:
        reason += f"; uid {uid} is charged to it, the owner of its {SUBUID_FILE} range"
    return reason


def inherited_slot(state_dir: Path, uid: int, slots: int) -> tuple[int | None, bool]:
    """(fd, allowed) for the slot kmskeys-gate took for `uid` (the charged uid,
    `charged_uid`); (None, True) if it took none.

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
    except ValueError:
        return None, True
    allowed = check_slot(fd, state_dir, uid, slots)
    if allowed is None:
        with contextlib.suppress(OSError):
            os.close(fd)
        return None, True
    os.set_inheritable(fd, False)  # the worker gets it through fork; nothing it execs does
    return fd, allowed
