"""Per-uid limits, checked before any expensive work: one uid must not starve the others.

Every miss of every local user runs a root handler, and every handler may call KMS. Two limits,
both shared by all handler processes (and the warm daemon) through lock files in the config's
root-only `state_dir` (a tmpfs, /run/kmskeys, by default):

- at most `max_concurrent_per_uid` handler runs per requesting uid at once: a slot is an
  flock(2) on one of that many files, held until the handler exits (the kernel drops it even
  when the process is killed). A request that finds every slot taken gets EAGAIN at once,
  before anything is imported or decrypted;
- a token bucket of `kms_burst_per_uid` tokens refilled at `kms_rate_per_uid` per second: each
  KMS call (retries included) takes one, so no uid can burn the account's KMS request quota.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import time
from pathlib import Path

from kmskeys.trust import unsafe_reason
from resolver.errors import ConfigError

# kmskeys-gate (resolver/gate.c) takes the slot before Python starts and passes the locked fd
# in this variable (SLOT_FD_ENV there). request-key runs with the kernel's fixed environment,
# so no requester can set it.
SLOT_FD_ENV = "KMSKEYS_SLOT_FD"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
# A bucket file holds (tokens, CLOCK_MONOTONIC seconds of the last refill): the clock is the
# same for every process on the host, and /run starts empty at boot.
_BUCKET = struct.Struct("=dd")


def _state_dir(path: Path) -> int:
    """An fd of the state directory, created root-only if missing; refused if unsafe."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"state_dir {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        raise ConfigError(f"state_dir {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    reason = unsafe_reason(st)
    if reason is None and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        reason = f"open to group or others (mode {stat.S_IMODE(st.st_mode):04o}, want 0700)"
    if reason:
        os.close(fd)
        raise ConfigError(f"state_dir {path} is unsafe: {reason}")
    return fd


def _open(dir_fd: int, name: str) -> int:
    fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=dir_fd)
    reason = unsafe_reason(os.fstat(fd))
    if reason:
        os.close(fd)
        raise ConfigError(f"state file {name} is unsafe: {reason}")
    return fd


def open_state_file(state_dir: Path, name: str) -> int:
    """An fd of the root-only lock file `name` in state_dir, created if missing."""
    dir_fd = _state_dir(state_dir)
    try:
        return _open(dir_fd, name)
    finally:
        os.close(dir_fd)


def acquire_slot(state_dir: Path, uid: int, slots: int) -> int | None:
    """An fd holding one of `uid`'s `slots` handler slots (keep it open), or None if all are
    taken."""
    dir_fd = _state_dir(state_dir)
    try:
        for index in range(slots):
            fd = _open(dir_fd, f"slot-{uid}-{index}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None
    finally:
        os.close(dir_fd)


def take_token(state_dir: Path, uid: int, rate: float, burst: int) -> bool:
    """Take one KMS-call token from `uid`'s bucket; False when it is empty."""
    dir_fd = _state_dir(state_dir)
    try:
        fd = _open(dir_fd, f"bucket-{uid}")
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
    prefix = f"slot-{uid}-"
    if directory != os.path.realpath(state_dir) or not name.startswith(prefix):
        os.close(fd)
        return None, True
    os.set_inheritable(fd, False)  # the worker gets it through fork; nothing it execs does
    index = name[len(prefix) :]
    return fd, index.isdigit() and int(index) < slots
