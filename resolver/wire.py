"""The wire between kmskeys-gate (C) and the resolver daemon: small binary messages, versioned.

Every message is a 12-byte header, then its body:

    magic "KMKD" | version u16 | type u16 | body length u32          (network byte order)

The gate sends REQUEST with its slot fd attached (SCM_RIGHTS); the daemon answers ACCEPTED
(how long the gate may wait for the outcome) or DECLINED (the gate runs the handler instead).
For a request whose requester must be identified (a program-bound name, a unit-bound blob), the
daemon then sends VIEW_ASK, once, and the gate answers VIEW: what the holder of the authority
sees of the request, /proc/keys included, read only then (the kernel walks every key on the
host to generate that file). Then OUTCOME (with the request's flush tokens, which the gate
compares again at its last moment); the gate carries it out on the key and sends REPORT (what
the kernel said), or ABANDON when it stopped waiting and answered or fell back by itself.
Bodies are fixed-layout integers followed by length-prefixed byte strings, every length
bounded: nothing the C side reads is text to parse, and the daemon re-validates every field
(resolver/daemon_request.py).
The constants reach the C side through kmskeys/contract.h (scripts/generate.py).
"""

from __future__ import annotations

import os
import socket
import struct

from kmskeys.contract import (
    ADMIN_GROUP_PERM,
    ADMIN_NEGATIVE_KEY_PERM,
    AUTH_LINE_MAX,
    AUTH_LINES_MAX,
    CALLOUT_MAX,
    DESCRIPTION_MAX,
    PERM_LINK,
    PERM_READ,
    PERM_SEARCH,
    PERM_VIEW,
    POSSESSOR_SHIFT,
    USER_PAYLOAD_MAX,
    USER_SHIFT,
)
from kmskeys.flushepoch import TOKEN_FILE_NAME_MAX, TOKEN_FILES_MAX, TOKEN_MAX, Tokens
from resolver.validators import MAX_NEGATIVE_TTL, MAX_TTL, MAX_TTL_JITTER

MAGIC = b"KMKD"
VERSION = 4
HEADER = struct.Struct("!4sHHI")
REQUEST, ACCEPTED, DECLINED, OUTCOME, REPORT, ABANDON, VIEW_ASK, VIEW = 1, 2, 3, 4, 5, 6, 7, 8
NAMES = {
    REQUEST: "request",
    ACCEPTED: "accepted",
    DECLINED: "declined",
    OUTCOME: "outcome",
    REPORT: "report",
    ABANDON: "abandon",
    VIEW_ASK: "view-ask",
    VIEW: "view",
}

# REQUEST: key (%k), uid (%u), gid (the key's, as KEYCTL_DESCRIBE shows it), the request's
# authorization key, when the gate started (CLOCK_MONOTONIC, microseconds: the log line's ms and
# the deadline count from it, as the handler's count from its start) and the requester's thread,
# process and session keyrings (%T %P %S, 0 for none); then four strings (u32 length, bytes):
# the gate's build stamp, the config its rule's handler would read (`handle --config PATH` on
# the rule line; empty: the default), the description (from KEYCTL_DESCRIBE) and the callout
# (read from the authorization key).
REQUEST_FIXED = struct.Struct("!IIIIQIII")
STRING_LENGTH = struct.Struct("!I")
STAMP_MAX = 64
CONFIG_PATH_MAX = 4096
REQUEST_MAX = (
    REQUEST_FIXED.size
    + 4 * STRING_LENGTH.size
    + STAMP_MAX
    + CONFIG_PATH_MAX
    + DESCRIPTION_MAX
    + CALLOUT_MAX
)

# VIEW_ASK: no body. VIEW: flags, how many lines of /proc/keys start with the authorization
# key's serial (kept or not) and the requester's destination keyring (0 for none); then two
# strings: the destination keyring's KEYCTL_DESCRIBE string, and those /proc/keys lines,
# newline-separated (resolver/requester.py's rules: the identification is the daemon's, issue
# 24). The gate answers one VIEW_ASK per request; the daemon asks only when the pipeline needs
# the view, and at most once.
VIEW_FIXED = struct.Struct("!III")
# The lines of /proc/keys the gate keeps: those starting with the authorization key's serial,
# none longer than AUTH_LINE_MAX bytes (the kernel's own is under 120: only a description makes
# one longer), at most AUTH_LINES_MAX + 1 (more than AUTH_LINES_MAX is forgery enough to judge;
# both kmskeys/contract.py, as resolver/requester.py reads them).
PROC_KEYS_MAX = (AUTH_LINES_MAX + 1) * (AUTH_LINE_MAX + 1)
DESTINATION_MAX = DESCRIPTION_MAX + 64
# The gate stops reading /proc/keys after this many bytes and says so (FLAG_PROC_KEYS_CUT).
PROC_KEYS_SCAN_MAX = 64 << 20
FLAG_PROC_KEYS_CUT = 1
VIEW_MAX = VIEW_FIXED.size + 2 * STRING_LENGTH.size + DESTINATION_MAX + PROC_KEYS_MAX

# ACCEPTED: milliseconds the gate waits for the OUTCOME (the daemon's deadline and a margin).
ACCEPTED_BODY = struct.Struct("!I")
OUTCOME_WAIT_MAX_MS = 65_000

# OUTCOME: errno (0: instantiate), uid, gid, perm (the answer's mask; 0 for a rejection),
# negative_perm (the mask of the key when it is rejected, before the reject: a refusal's, or that
# of an answer the kernel refused or root flushed meanwhile; resolver/answer.py negative_mask; 0
# leaves the kernel's default), timeout, negative_ttl, the keyring to link into on instantiation
# (0, or a KEY_SPEC_* id: the request's destination), payload length, and how many flush tokens
# follow; then the payload (1..USER_PAYLOAD_MAX bytes for an answer, none
# for a rejection); then each flush token of the request (kmskeys/flushepoch.py): its file's
# name in the gate's own `state_dir/flush/` (u32 length, bytes: [a-z0-9-], at most
# TOKEN_FILE_NAME_MAX) and what the daemon read in it (u32 length, bytes, at most TOKEN_MAX;
# TOKEN_ABSENT for no such file). The gate reads them again after the key's owner and mask are
# set, right before it answers, and rejects EAGAIN (STEP_FLUSHED) if one changed.
OUTCOME_FIXED = struct.Struct("!iIIIIIIiII")
TOKEN_ABSENT = 0xFFFFFFFF
FLUSH_TOKENS_MAX = (2 * STRING_LENGTH.size + TOKEN_FILE_NAME_MAX + TOKEN_MAX) * TOKEN_FILES_MAX
OUTCOME_MAX = OUTCOME_FIXED.size + USER_PAYLOAD_MAX + FLUSH_TOKENS_MAX
# The bits an answer's mask may hold, checked by the gate too: view, read, search and link for
# possessors and the owner, the admin group's (view, search, write, setattr: root's flush and
# refresh); never write or setattr for the owner or possessors, never anything for others
# (kmskeys/contract.py RESOLVED_KEY_PERM says why).
_USE = PERM_VIEW | PERM_READ | PERM_SEARCH | PERM_LINK
ANSWER_PERM_ALLOWED = (_USE << POSSESSOR_SHIFT) | (_USE << USER_SHIFT) | ADMIN_GROUP_PERM
# The bits a rejected key's mask may hold (kmskeys/contract.py ADMIN_NEGATIVE_KEY_PERM): the
# owner's, the admin group's view, search and setattr (root's flush expires it); never a
# possessor bit (a co-possessor's add_key would instantiate the refused key), never write.
NEGATIVE_PERM_ALLOWED = ADMIN_NEGATIVE_KEY_PERM
# A key's timeout at most: the longest ttl, spread by the most jitter.
TIMEOUT_MAX = int(MAX_TTL * (1 + MAX_TTL_JITTER)) + 1
NEGATIVE_TTL_MAX = MAX_NEGATIVE_TTL

# REPORT: the step that failed (STEP_*), its errno, the errno the key was rejected with (0: not
# rejected) and that reject's own errno (0: done).
REPORT_BODY = struct.Struct("!Iiii")
# How long the gate tries to hand over a REPORT or ABANDON (small messages, sent at once).
REPORT_WAIT_MS = 1000
# STEP_FLUSHED: a flush token changed (nothing failed): the gate rejected the key EAGAIN.
STEP_NONE, STEP_CHOWN, STEP_SETPERM, STEP_TIMEOUT, STEP_INSTANTIATE, STEP_FLUSHED = range(6)


class WireError(ValueError):
    """A message that is not what the wire allows; the connection is dropped."""


def header(kind: int, body: bytes) -> bytes:
    """A message: the header for `body`, then `body`."""
    return HEADER.pack(MAGIC, VERSION, kind, len(body)) + body


def parse_header(data: bytes) -> tuple[int, int]:
    """(type, body length) of a header; WireError for another magic or version."""
    magic, version, kind, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise WireError("not a kmskeys message")
    if version != VERSION:
        raise WireError(f"wire version {version}, this daemon speaks {VERSION}")
    if kind not in NAMES:
        raise WireError(f"unknown message type {kind}")
    return kind, length


class GateRequest:
    """What the gate sends: the kernel's facts about the request, as the gate read them."""

    __slots__ = (
        "auth",
        "callout",
        "config",
        "description",
        "gid",
        "key",
        "keyrings",
        "stamp",
        "started_us",
        "uid",
    )

    def __init__(self, body: bytes) -> None:
        if len(body) > REQUEST_MAX:
            raise WireError(f"request of {len(body)} bytes is over {REQUEST_MAX}")
        try:
            fixed = REQUEST_FIXED.unpack_from(body)
        except struct.error:
            raise WireError("request too short") from None
        self.key, self.uid, self.gid, self.auth, self.started_us = fixed[:5]
        self.keyrings: tuple[int, int, int] = fixed[5:8]
        limits = (STAMP_MAX, CONFIG_PATH_MAX, DESCRIPTION_MAX, CALLOUT_MAX)
        stamp, config, self.description, self.callout = _strings(body, REQUEST_FIXED.size, limits)
        self.stamp = stamp.decode("ascii", "replace")
        self.config = os.fsdecode(config)
        if not (0 < self.key < 1 << 31 and 0 < self.auth < 1 << 31):
            raise WireError("request names no key")

    def __repr__(self) -> str:  # never the callout: it may be a blob
        return f"GateRequest(key={self.key}, uid={self.uid})"


class GateView:
    """What the gate sends when asked (VIEW): the authority's view of the request."""

    __slots__ = ("dest", "dest_description", "flags", "lines", "seen")

    def __init__(self, body: bytes) -> None:
        if len(body) > VIEW_MAX:
            raise WireError(f"view of {len(body)} bytes is over {VIEW_MAX}")
        try:
            self.flags, self.seen, self.dest = VIEW_FIXED.unpack_from(body)
        except struct.error:
            raise WireError("view too short") from None
        destination, proc_keys = _strings(body, VIEW_FIXED.size, (DESTINATION_MAX, PROC_KEYS_MAX))
        self.dest_description = destination.decode("utf-8", "replace")
        self.lines = tuple(proc_keys.split(b"\n")) if proc_keys else ()
        if len(self.lines) > AUTH_LINES_MAX + 1 or any(len(x) > AUTH_LINE_MAX for x in self.lines):
            raise WireError("more /proc/keys lines, or longer ones, than the gate keeps")


def _strings(body: bytes, offset: int, limits: tuple[int, ...]) -> list[bytes]:
    """The length-prefixed strings from `offset` to the body's end, each within its limit."""
    strings = []
    for limit in limits:
        value, offset = _string(body, offset, limit)
        strings.append(value)
    if offset != len(body):
        raise WireError("message has trailing bytes")
    return strings


def _string(body: bytes, offset: int, limit: int) -> tuple[bytes, int]:
    try:
        (length,) = STRING_LENGTH.unpack_from(body, offset)
    except struct.error:
        raise WireError("message too short") from None
    start = offset + STRING_LENGTH.size
    if length > limit or start + length > len(body):
        raise WireError(f"a string of {length} bytes is over {limit} or past the end")
    return body[start : start + length], start + length


def outcome_message(
    errno: int,
    *,
    uid: int,
    gid: int,
    perm: int,
    negative_perm: int,
    timeout: int,
    negative_ttl: int,
    keyring: int = 0,
    payload: bytes = b"",
    tokens: Tokens = (),
) -> bytes:
    """An OUTCOME message; `tokens`, the request's flush tokens as read (flushepoch.Mark.tokens)."""
    fixed = OUTCOME_FIXED.pack(
        errno,
        uid,
        gid & 0xFFFFFFFF,
        perm,
        negative_perm,
        timeout,
        negative_ttl,
        keyring,
        len(payload),
        len(tokens),
    )
    return header(OUTCOME, fixed + payload + _tokens(tokens))


def _tokens(tokens: Tokens) -> bytes:
    if len(tokens) > TOKEN_FILES_MAX:
        raise WireError(f"{len(tokens)} flush tokens")
    out = []
    for file, token in tokens:
        name = file.encode("ascii")
        if len(name) > TOKEN_FILE_NAME_MAX or not set(name) <= _TOKEN_NAME_BYTES:
            raise WireError(f"flush token file {file!r}")
        out.append(STRING_LENGTH.pack(len(name)) + name)
        if token is None:
            out.append(STRING_LENGTH.pack(TOKEN_ABSENT))
        elif len(token) > TOKEN_MAX:
            raise WireError(f"a flush token of {len(token)} bytes")
        else:
            out.append(STRING_LENGTH.pack(len(token)) + token)
    return b"".join(out)


_TOKEN_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")


class Report:
    """What the gate did with an OUTCOME: the failed step and errnos (all zero: done)."""

    __slots__ = ("failed_errno", "reject_errno", "reject_result", "step")

    def __init__(self, body: bytes) -> None:
        if len(body) != REPORT_BODY.size:
            raise WireError(f"report of {len(body)} bytes")
        self.step, self.failed_errno, self.reject_errno, self.reject_result = REPORT_BODY.unpack(
            body
        )
        if self.step > STEP_FLUSHED:
            raise WireError(f"report names step {self.step}")


def is_abandon(head: bytes) -> bool:
    """Whether `head` is the header of an ABANDON."""
    try:
        return len(head) == HEADER.size and parse_header(head)[0] == ABANDON
    except WireError:
        return False


def receive_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The REQUEST's body and the fds that came with it (MSG_CMSG_CLOEXEC: never inherited)."""
    fds: list[int] = []
    try:
        head = _recv_exactly(conn, HEADER.size, fds)
        kind, length = parse_header(head)
        if kind != REQUEST or length > REQUEST_MAX:
            raise WireError(f"expected a request, got a {NAMES[kind]} of {length} bytes")
        return _recv_exactly(conn, length, fds), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _recv_exactly(conn: socket.socket, size: int, fds: list[int]) -> bytes:
    chunks, got = [], 0
    space = socket.CMSG_SPACE(4 * struct.calcsize("i"))
    while got < size:
        data, ancillary, _, _ = conn.recvmsg(size - got, space, socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
        if not data:
            raise ConnectionError("connection closed mid-message")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def read_message(conn: socket.socket, limit: int) -> tuple[int, bytes]:
    """One message of at most `limit` bytes of body (fds that came with it are closed)."""
    fds: list[int] = []
    try:
        kind, length = parse_header(_recv_exactly(conn, HEADER.size, fds))
        if length > limit:
            raise WireError(f"a {NAMES[kind]} of {length} bytes")
        return kind, _recv_exactly(conn, length, fds) if length else b""
    finally:
        for fd in fds:
            os.close(fd)
