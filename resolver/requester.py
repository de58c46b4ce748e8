"""Who asked: the task that triggered a request-key upcall, as the kernel recorded it.

The rest is comments: a bound miss loads this module, and comments cost it nothing."""

# The kernel keeps the triggering thread in the request's authorization key and prints it only in
# /proc/keys, to a reader that may view that key (the holder of the request's authority possesses
# it, through the `_req.N` session keyring the kernel gives request-key and what it runs):
#
#     11794e12 I------     4 perm 1b010000     0     0 .request_ key:3595579c pid:19014 ci:0
#
# What the holder sees is an AuthView: the handler gathers it itself (`view_here`); under the
# daemon path the gate gathers it and hands it over (docs/resolver.md, "Identifying the
# requester"). resolver/task.py then looks at the task through /proc. Key descriptions are
# hostile input: only lines that start with the authorization key's own serial count, and
# anything unclear refuses (docs/security.md, "Secrets bound to a program").
#
# Kernel facts relied on (each checked on 6.18 by tests/upcall/test_requester_identity.py):
# - `pid:` is the requesting *thread's* id in the initial pid namespace (rka->pid =
#   current->pid), also for a requester in a child pid namespace;
# - /proc/keys prints a type name in 9 columns (`%-9.9s`) and descriptions raw, newlines
#   included: a key's description can forge whole lines, even lines that start with the serial of
#   a key that exists; the kernel's own line for the authorization key is always there for its
#   holder, so the forgeries can only add lines, never hide it (`identify_all`);
# - the requesting thread waits in call_usermodehelper_exec (its wchan) while the upcall runs.

from __future__ import annotations

from kmskeys.contract import (
    AUTH_LINE_MAX,
    AUTH_LINES_MAX,
    KEY_SPEC_REQUESTOR_KEYRING,
    PROC_KEYS_READER_ID,
)
from resolver.errors import IdentityError, IdentityUnclearError, RequesterGoneError
from resolver.task import (
    PROC,
    Record,
    Requester,
    cgroup2_mount,
    check_alive,
    inspect_task,
    waits_for_upcall,
)

__all__ = [
    "PROC",
    "UNOWNED_ID",
    "AuthRecord",
    "AuthView",
    "IdentityError",
    "IdentityUnclearError",
    "Requester",
    "RequesterGoneError",
    "auth_lines",
    "auth_records",
    "check_alive",
    "identify",
    "identify_all",
    "own_auth_key",
    "read_proc_keys",
    "requestor_keyring",
    "view_here",
]

# The fsuid and fsgid /proc/keys is read with: (uid_t)-2, mapped in the initial user namespace
# and owning no keys. The kernel checks every key on the host for every reader, but formats
# only those the reader may view: as root, every key root owns (the host cache among them) and
# every key that grants group 0 or others VIEW; as this id, only the possessed authorization
# key and keys that grant others VIEW. Keys it might own would only add lines.
UNOWNED_ID = PROC_KEYS_READER_ID
_HEX = frozenset(b"0123456789abcdef")


class AuthView(Record):
    """What the holder of a request's authority sees of it, the identification's only input
    from the keyring: `auth`, the authorization key's serial; `lines`, every line of /proc/keys
    that starts with that serial (`%08x `), without its newline, read as UNOWNED_ID (the
    kernel's own, and any a key description forges); `dest`, the requester's destination
    keyring (KEY_SPEC_REQUESTOR_KEYRING), 0 if none, and `dest_description` its
    keyctl_describe string (`keyring;UID;GID;PERM;DESCRIPTION`)."""

    __slots__ = ("auth", "dest", "dest_description", "lines")

    def __init__(self, auth: int, lines: tuple[bytes, ...], dest: int, dest_description: str):
        self.auth, self.lines = auth, lines
        self.dest, self.dest_description = dest, dest_description


class AuthRecord(Record):
    """What one line for the authorization key says: the thread and its fsuid."""

    __slots__ = ("tid", "uid")

    def __init__(self, tid: int, uid: int) -> None:
        self.tid = tid
        self.uid = uid


def own_auth_key() -> int:
    """The serial of the authorization key this process has assumed."""
    from kmskeys import keyutils
    from kmskeys.errors import KmsKeysError

    try:
        return keyutils.keyctl_get_keyring_ID(keyutils.KEY_SPEC_REQKEY_AUTH_KEY, False)
    except KmsKeysError:
        raise IdentityError("no authorization key: the handler holds no authority") from None


def requestor_keyring() -> tuple[int, str]:
    """(serial, describe string) of the keyring request_key(2) links the key into, as the
    holder of the authority sees it; (0, "") when there is none to see."""
    from kmskeys import keyutils
    from kmskeys.errors import KmsKeysError

    try:
        serial = keyutils.keyctl_get_keyring_ID(KEY_SPEC_REQUESTOR_KEYRING, False)
        described = keyutils.keyctl_describe_alloc(KEY_SPEC_REQUESTOR_KEYRING)
    except KmsKeysError:
        return 0, ""
    return serial, described.decode("utf-8", "replace")


def view_here(target: int, proc: str = PROC) -> AuthView:
    """The AuthView of the request for key `target`, whose authority this process holds."""
    auth = own_auth_key()
    dest, described = requestor_keyring()
    return AuthView(auth, auth_lines(read_proc_keys(proc, target), auth), dest, described)


def read_proc_keys(proc: str = PROC, authority: int = 0) -> bytes:
    """/proc/keys, raw (descriptions may hold any byte but NUL), read as UNOWNED_ID.

    With `authority` (the key under construction), the assumed authority is set aside for the
    read and taken back after: with it, the kernel also searches the requester's keyrings for
    every key on the host it considers (twice the time with 1500 keys, measured), and keys only
    the requester possesses would show (and could forge lines).
    """
    if proc != PROC:
        return _read(f"{proc}/keys")
    from kmskeys import keyutils
    from kmskeys.errors import KmsKeysError

    uid, gid = keyutils.current_fsuid(), keyutils.current_fsgid()
    if authority:
        keyutils.keyctl_assume_authority(0)
    try:
        # Possession, not ownership, shows the authorization key (possessor VIEW, through the
        # `_req.N` session keyring), with or without the authority assumed.
        keyutils.set_fsuid(UNOWNED_ID)
        keyutils.set_fsgid(UNOWNED_ID)
        return _read(f"{proc}/keys")
    finally:
        keyutils.set_fsgid(gid)
        keyutils.set_fsuid(uid)
        if authority:
            try:
                keyutils.keyctl_assume_authority(authority)
            except KmsKeysError as exc:
                raise IdentityError(f"cannot take the authority back: {exc}") from None


def _read(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.readall()


def auth_lines(proc_keys: bytes, auth: int) -> tuple[bytes, ...]:
    """The lines of a /proc/keys text that start with `auth`'s serial, in order, but for lines
    over AUTH_LINE_MAX bytes (the kernel's own is under 120: only a description makes one
    longer) and past AUTH_LINES_MAX + 1 (enough to refuse: auth_records). The gate applies the
    same rules under the daemon path."""
    head = b"%08x " % auth
    found = [line for line in proc_keys.split(b"\n") if line.startswith(head)]
    return tuple(line for line in found if len(line) <= AUTH_LINE_MAX)[: AUTH_LINES_MAX + 1]


def auth_records(view: AuthView, target: int, uid: int | None = None) -> tuple[AuthRecord, ...]:
    """The requesters named by the lines for `view.auth`, deduplicated: the kernel's own line
    names the real one. `uid`, when given, is the request's (%u): the kernel's line agrees.

    One line: it must be the kernel's, for this request. Several: a key description forges
    some; each must then be in the kernel's shape for this request (else IdentityUnclearError:
    a forgery cannot make a refusal stick), and the caller judges every requester named.
    """
    auth, lines = view.auth, view.lines
    if not lines:
        raise IdentityError(f"authorization key {auth:08x} is not in /proc/keys")
    if len(lines) > AUTH_LINES_MAX:
        raise IdentityUnclearError(
            f"authorization key {auth:08x} starts {len(lines)} lines of /proc/keys: "
            "key descriptions forge them"
        )
    found: list[AuthRecord] = []
    problems: list[str] = []
    for line in lines:
        record = _record(line, auth, target, uid)
        if isinstance(record, str):
            problems.append(record)
        else:
            found.append(record)
    if not found:
        raise IdentityError(problems[0])
    if problems:
        raise IdentityUnclearError(
            f"authorization key {auth:08x} starts {len(lines)} lines of /proc/keys, "
            f"{len(problems)} not the kernel's: a key description forges them"
        )
    return tuple(dict.fromkeys(found))


def _record(line: bytes, auth: int, target: int, uid: int | None) -> AuthRecord | str:
    """The requester one line names, or why the kernel did not print it for this request."""
    found = _auth_line(line)
    if found is None:
        return f"authorization key {auth:08x}: its /proc/keys line is not one"
    flags, owner, key, tid = found
    if not flags.startswith(b"I") or any(flag in flags for flag in b"RDNi"):
        return f"authorization key {auth:08x} is not live ({flags.decode()})"
    if key != target:
        return f"authorization key {auth:08x} is not for key {target}"
    if tid <= 0:
        return f"authorization key {auth:08x} names no task"
    if uid is not None and owner != uid:
        return f"authorization key is for uid {owner}, the request for {uid}"
    return AuthRecord(tid=tid, uid=owner)


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


def identify_all(
    view: AuthView,
    target: int,
    uid: int | None = None,
    *,
    proc: str = PROC,
    cgroup_root: str | None = None,
) -> tuple[Requester | IdentityError, ...]:
    """Every requester the lines of `view` name (one, unless a description forges lines),
    each seen through /proc, or why it cannot be: the kernel's own requester is among them.
    Of several, only those waiting for an upcall count (task.waits_for_upcall), so a forgery
    must name a task that waits for one too to be judged at all.

    Raises IdentityError or IdentityUnclearError (auth_records), and RequesterGoneError if any
    of them is exiting: it may be the real one, which must then get nothing.
    """
    records = auth_records(view, target, uid)
    if len(records) > 1:
        # The real requester waits for this upcall: a task that does not is named by a
        # forgery, and is no requester to judge. If none seems to (a kernel whose wchan says
        # otherwise), every one is judged.
        waiting = tuple(r for r in records if waits_for_upcall(r.tid, proc))
        records = waiting or records
    seen: list[Requester | IdentityError] = []
    try:
        root = cgroup2_mount() if cgroup_root is None else cgroup_root
        for record in records:
            try:
                seen.append(inspect_task(record.tid, record.uid, proc=proc, cgroup_root=root))
            except IdentityError as exc:
                seen.append(exc)
    except OSError as exc:
        # A file of /proc or the cgroup tree that even root cannot read: nothing is certain.
        what = exc.strerror or type(exc).__name__
        raise IdentityError(f"cannot read what the kernel shows of the requester: {what}") from None
    return tuple(seen)


def identify(
    target: int,
    *,
    auth: int | None = None,
    uid: int | None = None,
    proc: str = PROC,
    cgroup_root: str | None = None,
) -> Requester:
    """The one requester of key `target`, whose construction this process has authority over.

    `uid`, when given, is the requester's uid as request-key passed it (%u): the authorization
    key must agree. Lines that name several requesters refuse (the pipeline judges them all
    instead: resolver/binding.py). Raises IdentityError (refuse), IdentityUnclearError or
    RequesterGoneError (answer EAGAIN).
    """
    if auth is None:
        view = view_here(target, proc)
    else:
        view = AuthView(auth, auth_lines(read_proc_keys(proc), auth), 0, "")
    found = identify_all(view, target, uid, proc=proc, cgroup_root=cgroup_root)
    if len(found) > 1:
        raise IdentityUnclearError(
            f"authorization key {view.auth:08x}: {len(view.lines)} lines of /proc/keys name "
            f"{len(found)} requesters: a key description forges them"
        )
    if isinstance(found[0], IdentityError):
        raise found[0]
    return found[0]
