"""A requesting task as /proc and the cgroup tree show it: its cgroup (hence its systemd unit),
its executable and its parents.

The rest is comments: a bound miss loads this module, and comments cost it nothing."""

# resolver/requester.py finds the task's id where only the kernel could have written it; this
# module looks at that task. Cgroup names and executable paths are hostile input: every file is
# taken from where the kernel alone could have put it, and anything unclear refuses
# (docs/security.md, "Secrets bound to a program"). Stdlib only; a few reads of /proc and some
# stats.
#
# Kernel facts relied on (each checked on 6.18 by tests/upcall/test_requester_identity.py):
# - the requesting thread sleeps uninterruptibly (UMH_WAIT_PROC, state D) until the handler
#   exits, even with SIGKILL pending, so its id cannot be reused meanwhile and it cannot exec; an
#   execve in another thread waits for it too (de_thread), having queued SIGKILL to it; its
#   /proc/PID/wchan says `call_usermodehelper_exec` meanwhile;
# - the kernel refuses a cgroup name holding a newline (EINVAL), so /proc/PID/cgroup has one
#   `0::` line on a host where cgroup2 is mounted; other control characters pass raw.

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Sequence
from functools import cache

from kmskeys.contract import UNIT_SUFFIXES
from resolver.errors import IdentityError, RequesterGoneError
from resolver.log import field, format_fields

PROC = "/proc"
MOUNTINFO = "/proc/self/mountinfo"
# Where systemd mounts cgroup2: unified mode, then hybrid mode; otherwise mountinfo says.
CGROUP2_USUAL = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
# How many ancestors the log line names (informational: a parent may exit and be replaced).
MAX_PARENTS = 3
_SIGKILL_MASK = 1 << (signal.SIGKILL - 1)
# Where a task waiting for request-key's upcall sleeps (request_key_and_link ->
# call_sbin_request_key -> call_usermodehelper_exec, UMH_WAIT_PROC), as /proc/PID/wchan says.
UPCALL_WCHAN = b"call_usermodehelper_exec"
# Files through which a cgroup's owner can add processes or child groups: one that a non-root
# uid may write marks a delegated cgroup (systemd's Delegate=, user@UID.service).
_DELEGATION_FILES = ("", "/cgroup.procs", "/cgroup.threads")


class Record:
    """A value: equality, hash and repr from its __slots__ (the identification's small records;
    not a dataclass or NamedTuple, whose creation costs a miss a few hundred microseconds)."""

    __slots__: tuple[str, ...] = ()

    def fields(self) -> tuple[object, ...]:
        """The values, in __slots__ order."""
        return tuple(getattr(self, name) for name in self.__slots__)

    def as_dict(self) -> dict[str, object]:
        """The values by name."""
        return dict(zip(self.__slots__, self.fields(), strict=True))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.fields() == self.fields()

    def __hash__(self) -> int:
        return hash(self.fields())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.as_dict().items())
        return f"{type(self).__name__}({shown})"


class Requester(Record):
    """The requesting task as the kernel shows it. `trusted` is the leading part of `cgroup`
    that only root could have named (all of it unless a cgroup on the way is delegated); `unit`
    is read from it. `exe_problem` is None when `exe` is the running file and only root can
    change what that path names."""

    __slots__ = ("cgroup", "exe", "exe_problem", "parents", "tgid", "tid", "trusted", "uid", "unit")

    def __init__(
        self,
        *,
        tid: int,
        tgid: int,
        uid: int,
        parents: tuple[int, ...],
        cgroup: str,
        trusted: str,
        unit: str | None,
        exe: str | None,
        exe_problem: str | None,
    ) -> None:
        self.tid, self.tgid, self.uid, self.parents = tid, tgid, uid, parents
        self.cgroup, self.trusted, self.unit = cgroup, trusted, unit
        self.exe, self.exe_problem = exe, exe_problem

    def summary(self) -> str:
        """One log-safe line of what was seen (hostile strings quoted by resolver.log.field)."""
        return format_fields(
            pid=self.tid,
            tgid=self.tgid if self.tgid != self.tid else None,
            ppids=",".join(map(str, self.parents)) or None,
            unit=self.unit,
            cgroup=self.cgroup,
            delegated_at=self.trusted if self.trusted != self.cgroup else None,
            exe=self.exe,
            exe_note=self.exe_problem,
        )


def inspect_task(tid: int, uid: int, *, proc: str = PROC, cgroup_root: str) -> Requester:
    """The requesting thread `tid` of fsuid `uid`, seen through /proc: cgroup, executable,
    parents. Raises IdentityError, or RequesterGoneError for a task exiting or killed."""
    status = _status(f"{proc}/{tid}/status", tid, uid)
    tgid = status["Tgid"]
    base = f"{proc}/{tgid}/task/{tid}"
    try:
        cgroup = cgroup_path(_read(f"{base}/cgroup"))
        exe, exe_problem = _exe(base)
    except (FileNotFoundError, ProcessLookupError):
        raise RequesterGoneError("requester exited during identification") from None
    parts = cgroup.split("/")[1:] if cgroup != "/" else []
    depth = trusted_depth(cgroup_root, parts)
    return Requester(
        tid=tid,
        tgid=tgid,
        uid=uid,
        parents=_parents(proc, status["PPid"]),
        cgroup=cgroup,
        trusted="/" + "/".join(parts[:depth]),
        unit=unit_of(parts[:depth]),
        exe=exe,
        exe_problem=exe_problem,
    )


def check_alive(who: Requester, proc: str = PROC) -> None:
    """Raise RequesterGoneError unless `who` still waits, unkilled: the pipeline calls it just
    before it answers, since a requester killed meanwhile would receive nothing."""
    _status(f"{proc}/{who.tgid}/task/{who.tid}/status", who.tid, who.uid)


def waits_for_upcall(tid: int, proc: str = PROC) -> bool:
    """True if task `tid` sleeps where a request_key(2) caller waits for its upcall, as the
    kernel's wchan names it (readable by root; Yama does not restrict it): the real requester
    always does while the resolver runs; a task a forged /proc/keys line names seldom does."""
    try:
        return _read(f"{proc}/{tid}/wchan") == UPCALL_WCHAN
    except OSError:
        return False


def _read(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.readall()


def _status(path: str, tid: int, uid: int) -> dict[str, int]:
    """Tgid and PPid from a task's status file, after checking it is the waiting requester."""
    try:
        raw = _read(path)
    except (FileNotFoundError, ProcessLookupError):
        raise RequesterGoneError("requester has exited") from None
    try:
        state = _status_field(raw, b"State")[:1]
        pending = int(_status_field(raw, b"SigPnd"), 16) | int(_status_field(raw, b"ShdPnd"), 16)
        ids = {key: int(_status_field(raw, key.encode())) for key in ("Pid", "Tgid", "PPid")}
        fsuid = int(_status_field(raw, b"Uid").split()[3])
    except (KeyError, ValueError, IndexError):
        raise IdentityError(f"requester {tid}: unreadable status") from None
    if state in (b"Z", b"X") or pending & _SIGKILL_MASK:
        raise RequesterGoneError(f"requester {tid} is exiting (killed)")
    if ids["Pid"] != tid:
        raise IdentityError(f"requester {tid}: status names task {ids['Pid']}")
    if fsuid != uid:
        # The waiting thread cannot change its own credentials: another task is showing here.
        raise IdentityError(f"requester {tid} has fsuid {fsuid}, its request {uid}")
    return ids


def _status_field(raw: bytes, name: bytes) -> bytes:
    """The value of line `NAME:\tVALUE` of a status file (KeyError if it has none). The kernel
    escapes the one free-text field (Name), so every line is its own, and only the first line
    has no newline before it (Name, never looked up)."""
    start = raw.find(b"\n" + name + b":\t")
    if start < 0:
        raise KeyError(name)
    start += len(name) + 3
    end = raw.find(b"\n", start)
    return raw[start:] if end < 0 else raw[start:end]


def cgroup_path(raw: bytes) -> str:
    """The cgroup v2 path in a /proc/PID/cgroup file, refusing a file the kernel did not write."""
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    unified = [line for line in lines if line.startswith(b"0::")]
    if len(unified) != 1:
        raise IdentityError(f"cgroup: {len(unified)} cgroup2 lines, not one")
    if not all(_kernel_cgroup_line(line) for line in lines):
        raise IdentityError("cgroup: a line the kernel does not write")
    path = unified[0][3:]
    if path != b"/" and any(part in (b"", b".", b"..") for part in path.split(b"/")[1:]):
        # `/..` is how the kernel shows a cgroup outside the reader's cgroup namespace.
        raise IdentityError(f"cgroup: {field(os.fsdecode(path))} is not below this namespace")
    return os.fsdecode(path)


def _kernel_cgroup_line(line: bytes) -> bool:
    """HIERARCHY-ID:CONTROLLERS:PATH, as the kernel writes each line of /proc/PID/cgroup."""
    hierarchy, sep, rest = line.partition(b":")
    _controllers, sep2, path = rest.partition(b":")
    return bool(sep and sep2) and hierarchy.isdigit() and path.startswith(b"/")


def trusted_depth(cgroup_root: str, parts: Sequence[str]) -> int:
    """How many leading components of a cgroup path only root could have named.

    A cgroup whose directory, cgroup.procs or cgroup.threads a non-root uid may write is
    delegated: its own name was chosen by root, the names below it by that uid.
    """
    path = cgroup_root
    for depth, part in enumerate(parts, 1):
        path = f"{path}/{part}"
        for name in _DELEGATION_FILES:
            try:
                st = os.lstat(path + name)
            except FileNotFoundError:
                raise IdentityError(
                    f"cgroup {field(path.removeprefix(cgroup_root))} is not under {cgroup_root}"
                ) from None
            if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return depth
    return len(parts)


def unit_of(parts: Sequence[str]) -> str | None:
    """The systemd unit a cgroup path names: its last component with a unit suffix, if any."""
    for part in reversed(parts):
        for suffix in UNIT_SUFFIXES:
            if part.endswith(suffix) and len(part) > len(suffix):
                return part
    return None


def _exe(base: str) -> tuple[str | None, str | None]:
    """(the executable's path, None) or (path or None, why the path cannot be trusted)."""
    try:
        target = os.readlink(f"{base}/exe")
        running = os.stat(f"{base}/exe")
    except PermissionError:
        return None, "unreadable"
    if not target.startswith("/"):
        return None, "not a file path"
    try:
        # The link shows the path the file had when it was executed, with " (deleted)" once
        # it is unlinked; only the same inode at that path now proves it (and a file can be
        # named "x (deleted)" on purpose).
        on_disk = os.stat(target)
    except OSError:
        return target, "not at that path (deleted, replaced or in another mount namespace)"
    if (on_disk.st_dev, on_disk.st_ino) != (running.st_dev, running.st_ino):
        return target, "replaced: the path now names another file"
    writer = _non_root_writer(target)
    if writer is not None:
        return target, f"{field(writer)} is writable by a non-root user"
    return target, None


def _non_root_writer(path: str) -> str | None:
    """The file, or a directory above it, that a non-root user could change, if any.

    A root-owned sticky directory (/tmp) counts as root's: others may add entries to it, but
    not rename or remove the root-owned one below it, which the walk up has already checked.
    """
    current = path
    while True:
        st = os.lstat(current)
        shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if st.st_uid != 0 or (
            shared and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX)
        ):
            return current
        if current == "/":
            return None
        current = os.path.dirname(current)


def _parents(proc: str, ppid: int) -> tuple[int, ...]:
    """Up to MAX_PARENTS ancestor pids, nearest first (for the log only)."""
    chain: list[int] = []
    pid = ppid
    while pid > 0 and len(chain) < MAX_PARENTS:
        chain.append(pid)
        if len(chain) == MAX_PARENTS:
            break  # the last one's parent is not shown: no need to read it
        try:
            # Field 4 of stat, after the command name in parentheses (which may hold any byte).
            pid = int(_read(f"{proc}/{pid}/stat").rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return tuple(chain)


@cache
def cgroup2_mount(candidates: tuple[str, ...] = CGROUP2_USUAL, mountinfo: str = MOUNTINFO) -> str:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on a hybrid host)."""
    for candidate in candidates:
        # Only a cgroup2 root has cgroup.controllers and no cgroup.events (and only root could
        # make a directory here that looks like one).
        if os.path.exists(f"{candidate}/cgroup.controllers") and not os.path.exists(
            f"{candidate}/cgroup.events"
        ):
            return candidate
    with open(mountinfo, "rb") as f:
        for line in f:
            # ID PARENT DEV ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
            head, sep, tail = line.partition(b" - ")
            fields = head.split(b" ")
            if sep and tail.startswith(b"cgroup2 ") and len(fields) > 4 and fields[3] == b"/":
                return _unescape(fields[4])
    raise IdentityError("no cgroup2 hierarchy is mounted: the requester's unit cannot be read")


def _unescape(raw: bytes) -> str:
    import re

    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), raw))
