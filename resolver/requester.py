"""Who asked: the task that triggered a request-key upcall, as the kernel recorded it.

The kernel keeps the triggering thread in the request's authorization key and prints it only in
/proc/keys, to a reader that may view that key (the handler possesses it, through the `_req.N`
session keyring the kernel gives request-key):

    11794e12 I------     4 perm 1b010000     0     0 .request_ key:3595579c pid:19014 ci:0

Everything else comes from /proc/PID: the cgroup (hence the systemd unit), the executable and
the parent chain. Key descriptions and cgroup names are hostile input, so every line is taken
from where the kernel alone could have put it, and anything unclear refuses (docs/security.md,
"Secrets bound to a program"). Stdlib only, except for the one keyctl call that finds the
handler's own authorization key; a few reads of /proc and some stats, well under a millisecond.

Kernel facts relied on (each checked on 6.18 by tests/upcall/test_requester_identity.py):
- `pid:` is the requesting *thread's* id in the initial pid namespace (rka->pid =
  current->pid), also for a requester in a child pid namespace;
- that thread sleeps uninterruptibly (UMH_WAIT_PROC, state D) until the handler exits, even
  with SIGKILL pending, so its id cannot be reused meanwhile and it cannot exec; an execve in
  another thread waits for it too (de_thread), having queued SIGKILL to it;
- /proc/keys prints a type name in 9 columns (`%-9.9s`) and descriptions raw, newlines
  included: a user's key can forge whole lines, but never give a line the serial of a key that
  exists, so a serial that starts two lines is a forgery;
- the kernel refuses a cgroup name holding a newline (EINVAL), so /proc/PID/cgroup has one
  `0::` line on a host where cgroup2 is mounted; other control characters pass raw.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Sequence
from functools import cache

from resolver.errors import RefusedError, UnavailableError
from resolver.log import field, format_fields

PROC = "/proc"
MOUNTINFO = "/proc/self/mountinfo"
# Where systemd mounts cgroup2: unified mode, then hybrid mode; otherwise mountinfo says.
CGROUP2_USUAL = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
# How many ancestors the log line names (informational: a parent may exit and be replaced).
MAX_PARENTS = 6
# systemd unit types whose cgroup holds processes (slices only hold other cgroups).
UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")
_SIGKILL_MASK = 1 << (signal.SIGKILL - 1)
# The fsuid and fsgid /proc/keys is read with: (uid_t)-2, mapped in the initial user namespace
# and owning no keys. The kernel checks every key on the host for every reader, but formats
# only those the reader may view: as root, every key root owns (the host cache among them) and
# every key that grants group 0 or others VIEW (measured 330 us with 270 keys on the host); as
# this id, only the possessed authorization key and keys that grant others VIEW (110 us). Keys
# it might own would only add lines, each a forgery that refuses or none.
UNOWNED_ID = 0xFFFFFFFE
# Files through which a cgroup's owner can add processes or child groups: one that a non-root
# uid may write marks a delegated cgroup (systemd's Delegate=, user@UID.service).
_DELEGATION_FILES = ("", "/cgroup.procs", "/cgroup.threads")
_HEX = frozenset(b"0123456789abcdef")


class IdentityError(RefusedError):
    """The requester could not be identified beyond doubt (EKEYREJECTED); the log says why."""


class RequesterGoneError(UnavailableError):
    """The requester exited or is being killed (EAGAIN, never cached: a waiter retries)."""

    outcome = "gone"
    alarm = False


class Record:
    """A value: equality, hash and repr from its __slots__. Not a dataclass or NamedTuple, whose
    creation costs each miss that imports this module a few hundred microseconds."""

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


class AuthRecord(Record):
    """What the authorization key's own /proc/keys line says: the thread and its fsuid."""

    __slots__ = ("tid", "uid")

    def __init__(self, tid: int, uid: int) -> None:
        self.tid = tid
        self.uid = uid


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


def own_auth_key() -> int:
    """The serial of the authorization key this process has assumed."""
    from kmskeys import keyutils
    from kmskeys.errors import KmsKeysError

    try:
        return keyutils.keyctl_get_keyring_ID(keyutils.KEY_SPEC_REQKEY_AUTH_KEY, False)
    except KmsKeysError:
        raise IdentityError("no authorization key: the handler holds no authority") from None


def read_proc_keys(proc: str = PROC) -> bytes:
    """/proc/keys, raw (descriptions may hold any byte but NUL), read as UNOWNED_ID."""
    if proc != PROC:
        return _read(f"{proc}/keys")
    from kmskeys import keyutils

    uid, gid = keyutils.current_fsuid(), keyutils.current_fsgid()
    try:
        # Possession, not ownership, shows the authorization key (possessor VIEW).
        keyutils.set_fsuid(UNOWNED_ID)
        keyutils.set_fsgid(UNOWNED_ID)
        return _read(f"{proc}/keys")
    finally:
        keyutils.set_fsgid(gid)
        keyutils.set_fsuid(uid)


def auth_record(proc_keys: bytes, auth: int, target: int) -> AuthRecord:
    """The requester recorded in authorization key `auth` for key `target`, from /proc/keys.

    Only a line that starts with `auth`'s serial can be the kernel's own; a description with a
    newline can forge such a line, but then the serial starts two lines, and that refuses.
    """
    head = b"%08x " % auth
    lines = [line for line in proc_keys.split(b"\n") if line.startswith(head)]
    if not lines:
        raise IdentityError(f"authorization key {auth:08x} is not in /proc/keys")
    if len(lines) > 1:
        raise IdentityError(
            f"authorization key {auth:08x} starts {len(lines)} lines of /proc/keys: "
            "a key description forges it"
        )
    found = _auth_line(lines[0])
    if found is None:
        raise IdentityError(f"authorization key {auth:08x}: its /proc/keys line is not one")
    flags, uid, key, tid = found
    if not flags.startswith(b"I") or any(flag in flags for flag in b"RDNi"):
        raise IdentityError(f"authorization key {auth:08x} is not live ({flags.decode()})")
    if key != target:
        raise IdentityError(f"authorization key {auth:08x} is not for key {target}")
    if tid <= 0:
        raise IdentityError(f"authorization key {auth:08x} names no task")
    return AuthRecord(tid=tid, uid=uid)


def _auth_line(line: bytes) -> tuple[bytes, int, int, int] | None:
    """(flags, uid, target, pid) from a line shaped as the kernel prints an authorization key,
    `SERIAL FLAGS USAGE EXPIRY PERM UID GID .request_ key:TARGET pid:PID ci:LEN`, else None."""
    # The kernel pads its columns with spaces, and never prints any other whitespace here.
    fields = [item for item in line.split(b" ") if item]
    if len(fields) != 11 or line.endswith(b" "):
        return None
    serial, flags, usage, _expiry, perm, uid, gid, kind, key, pid, callout = fields
    if (
        kind != b".request_"
        or len(flags) != 7
        or not all(_is_hex(x, 8) for x in (serial, perm))
        or not all(x.isdigit() for x in (usage, uid, gid))
        or not (key.startswith(b"key:") and _is_hex(key[4:]))
        or not (pid.startswith(b"pid:") and pid[4:].isdigit())
        or not (callout.startswith(b"ci:") and callout[3:].isdigit())
    ):
        return None
    return flags, int(uid), int(key[4:], 16), int(pid[4:])


def _is_hex(text: bytes, width: int | None = None) -> bool:
    # Not int(x, 16) alone: it also takes "0x", "_", signs and surrounding whitespace.
    return bool(text) and _HEX.issuperset(text) and (width is None or len(text) == width)


def identify(
    target: int,
    *,
    auth: int | None = None,
    uid: int | None = None,
    proc: str = PROC,
    cgroup_root: str | None = None,
) -> Requester:
    """The requester of key `target`, whose construction this process has authority over.

    `uid`, when given, is the requester's uid as request-key passed it (%u): the authorization
    key must agree. Raises IdentityError (refuse) or RequesterGoneError (answer EAGAIN).
    """
    serial = own_auth_key() if auth is None else auth
    try:
        record = auth_record(read_proc_keys(proc), serial, target)
        if uid is not None and record.uid != uid:
            raise IdentityError(f"authorization key is for uid {record.uid}, the request for {uid}")
        root = cgroup2_mount() if cgroup_root is None else cgroup_root
        return inspect_task(record, proc=proc, cgroup_root=root)
    except OSError as exc:
        # A file of /proc or the cgroup tree that even root cannot read: nothing is certain.
        what = exc.strerror or type(exc).__name__
        raise IdentityError(f"cannot read what the kernel shows of the requester: {what}") from None


def inspect_task(record: AuthRecord, *, proc: str = PROC, cgroup_root: str) -> Requester:
    """The requesting thread `record.tid` seen through /proc: cgroup, executable, parents."""
    status = _status(f"{proc}/{record.tid}/status", record)
    tgid = status["Tgid"]
    base = f"{proc}/{tgid}/task/{record.tid}"
    try:
        cgroup = cgroup_path(_read(f"{base}/cgroup"))
        exe, exe_problem = _exe(base)
    except (FileNotFoundError, ProcessLookupError):
        raise RequesterGoneError("requester exited during identification") from None
    parts = cgroup.split("/")[1:] if cgroup != "/" else []
    depth = trusted_depth(cgroup_root, parts)
    trusted = "/" + "/".join(parts[:depth])
    parents = _parents(proc, status["PPid"])
    return Requester(
        tid=record.tid,
        tgid=tgid,
        uid=record.uid,
        parents=parents,
        cgroup=cgroup,
        trusted=trusted,
        unit=unit_of(parts[:depth]),
        exe=exe,
        exe_problem=exe_problem,
    )


def check_alive(who: Requester, proc: str = PROC) -> None:
    """Raise RequesterGoneError unless `who` still waits, unkilled: the handler calls it just
    before it instantiates, since a requester killed meanwhile would receive nothing."""
    _status(f"{proc}/{who.tgid}/task/{who.tid}/status", AuthRecord(who.tid, who.uid))


def _read(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.readall()


def _status(path: str, record: AuthRecord) -> dict[str, int]:
    """Tgid and PPid from a task's status file, after checking it is the waiting requester."""
    try:
        raw = _read(path)
    except (FileNotFoundError, ProcessLookupError):
        raise RequesterGoneError("requester has exited") from None
    # The kernel escapes the one free-text field (Name), so every line is its own.
    fields: dict[bytes, bytes] = {}
    for line in raw.split(b"\n"):
        key, sep, value = line.partition(b":\t")
        if sep:
            fields[key] = value
    try:
        state = fields[b"State"][:1]
        pending = int(fields[b"SigPnd"], 16) | int(fields[b"ShdPnd"], 16)
        ids = {key: int(fields[key.encode()]) for key in ("Pid", "Tgid", "PPid")}
        fsuid = int(fields[b"Uid"].split()[3])
    except (KeyError, ValueError, IndexError):
        raise IdentityError(f"requester {record.tid}: unreadable status") from None
    if state in (b"Z", b"X") or pending & _SIGKILL_MASK:
        raise RequesterGoneError(f"requester {record.tid} is exiting (killed)")
    if ids["Pid"] != record.tid:
        raise IdentityError(f"requester {record.tid}: status names task {ids['Pid']}")
    if fsuid != record.uid:
        # The waiting thread cannot change its own credentials: another task is showing here.
        raise IdentityError(f"requester {record.tid} has fsuid {fsuid}, its request {record.uid}")
    return ids


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
