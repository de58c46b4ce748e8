"""The gate-daemon wire (resolver/wire.py) and the daemon's replay of the gate's report."""

from __future__ import annotations

import errno
import struct

import pytest

from kmskeys import contract
from kmskeys.contract import (
    ADMIN_KEY_PERM,
    ADMIN_NEGATIVE_KEY_PERM,
    CALLOUT_MAX,
    DESCRIPTION_MAX,
    NEGATIVE_KEY_PERM,
    PERM_WRITE,
    POSSESSOR_MASK,
    RESOLVED_KEY_PERM,
    USER_SHIFT,
)
from kmskeys.flushepoch import Tokens
from resolver import wire
from resolver.answer import answer
from resolver.daemon_gate import ReplayKey, outcome_message_of
from resolver.errors import RefusedError
from resolver.log import LOG_ERR, LOG_INFO
from resolver.outcome import Outcome

pytestmark = pytest.mark.unit


def _request(**changes: object) -> bytes:
    fields = {"key": 7, "uid": 1000, "gid": 1000, "auth": 9, "us": 5}
    fields.update(changes)
    strings = [
        changes.get("stamp", b"0.1.0+x"),
        changes.get("config", b"/etc/kmskeys/resolver.toml"),
        changes.get("description", b"kms:db"),
        changes.get("callout", b""),
    ]
    body = wire.REQUEST_FIXED.pack(
        fields["key"], fields["uid"], fields["gid"], fields["auth"], fields["us"], 11, 12, 13
    )
    return body + _strings(strings)


def _view(**changes: object) -> bytes:
    fields = {"flags": 0, "seen": 1, "dest": 14}
    fields.update(changes)
    strings = [
        changes.get("destination", b"keyring;1000;1000;3f010000;_ses"),
        changes.get("proc_keys", b"00000009 I--Q--- 1 perm 3f010000 1000 1000 .request_ "),
    ]
    body = wire.VIEW_FIXED.pack(fields["flags"], fields["seen"], fields["dest"])
    return body + _strings(strings)


def _strings(strings: list[object]) -> bytes:
    body = b""
    for value in strings:
        assert isinstance(value, bytes)
        body += wire.STRING_LENGTH.pack(len(value)) + value
    return body


def test_a_request_reads_back_every_field() -> None:
    request = wire.GateRequest(_request(description=b"kms:a\nb", callout=b"\xff" * CALLOUT_MAX))
    assert (request.key, request.uid, request.gid, request.auth) == (7, 1000, 1000, 9)
    assert request.description == b"kms:a\nb" and len(request.callout) == CALLOUT_MAX
    assert request.started_us == 5 and request.stamp == "0.1.0+x"
    assert request.keyrings == (11, 12, 13)
    assert request.config == "/etc/kmskeys/resolver.toml"
    assert "callout" not in repr(request) and "\\xff" not in repr(request)


def test_a_view_reads_back_every_field() -> None:
    view = wire.GateView(_view(flags=wire.FLAG_PROC_KEYS_CUT, seen=2))
    assert (view.flags, view.seen, view.dest) == (wire.FLAG_PROC_KEYS_CUT, 2, 14)
    assert view.dest_description == "keyring;1000;1000;3f010000;_ses"
    assert view.lines == (b"00000009 I--Q--- 1 perm 3f010000 1000 1000 .request_ ",)
    assert wire.GateView(_view(proc_keys=b"", destination=b"")).lines == ()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        _request()[:-1],  # a string past the end
        _request() + b"x",  # trailing bytes
        _request(description=b"k" * (DESCRIPTION_MAX + 1)),
        _request(callout=b"c" * (CALLOUT_MAX + 1)),
        _request(stamp=b"s" * (wire.STAMP_MAX + 1)),
        _request(key=0),
        _request(auth=1 << 31),
        b"\0" * (wire.REQUEST_MAX + 1),
    ],
    ids=[
        "empty",
        "short",
        "trailing",
        "long-desc",
        "long-callout",
        "long-stamp",
        "no-key",
        "bad-auth",
        "huge",
    ],
)
def test_a_request_out_of_bounds_is_refused(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.GateRequest(body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        _view()[:-1],
        _view() + b"x",
        _view(destination=b"d" * (wire.DESTINATION_MAX + 1)),
        _view(proc_keys=b"\n".join([b"x"] * (contract.AUTH_LINES_MAX + 2))),
        _view(proc_keys=b"x" * (contract.AUTH_LINE_MAX + 1)),
        b"\0" * (wire.VIEW_MAX + 1),
    ],
    ids=["empty", "short", "trailing", "long-dest", "too-many-lines", "long-line", "huge"],
)
def test_a_view_out_of_bounds_is_refused(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.GateView(body)


def test_headers_of_another_magic_version_or_type_are_refused() -> None:
    assert wire.parse_header(wire.header(wire.REPORT, b"x" * 16)[:12]) == (wire.REPORT, 16)
    for head in (
        wire.HEADER.pack(b"HTTP", wire.VERSION, wire.REQUEST, 0),
        wire.HEADER.pack(wire.MAGIC, wire.VERSION + 1, wire.REQUEST, 0),
        wire.HEADER.pack(wire.MAGIC, wire.VERSION, 99, 0),
    ):
        with pytest.raises(wire.WireError):
            wire.parse_header(head)


def test_an_outcome_packs_as_the_gate_reads_it() -> None:
    message = wire.outcome_message(
        0,
        uid=5,
        gid=-1,
        perm=RESOLVED_KEY_PERM,
        negative_perm=NEGATIVE_KEY_PERM,
        timeout=300,
        negative_ttl=10,
        payload=b"s3",
    )
    kind, length = wire.parse_header(message[: wire.HEADER.size])
    body = message[wire.HEADER.size :]
    assert (kind, length) == (wire.OUTCOME, wire.OUTCOME_FIXED.size + 2)
    fields = wire.OUTCOME_FIXED.unpack_from(body)
    assert fields == (0, 5, 0xFFFFFFFF, RESOLVED_KEY_PERM, NEGATIVE_KEY_PERM, 300, 10, 0, 2, 0)
    assert body[wire.OUTCOME_FIXED.size :] == b"s3"
    assert not RESOLVED_KEY_PERM & ~wire.ANSWER_PERM_ALLOWED


def test_an_outcome_carries_the_flush_tokens_the_gate_compares() -> None:
    tokens = (("all", b"\x01" * 16), ("p-" + "a" * 32, None), ("n-" + "b" * 32, b""))
    message = wire.outcome_message(
        0,
        uid=5,
        gid=7,
        perm=RESOLVED_KEY_PERM,
        negative_perm=NEGATIVE_KEY_PERM,
        timeout=300,
        negative_ttl=10,
        payload=b"s3",
        tokens=tokens,
    )
    body = message[wire.HEADER.size :]
    assert wire.OUTCOME_FIXED.unpack_from(body)[-1] == 3
    rest = body[wire.OUTCOME_FIXED.size + 2 :]
    assert rest == (
        b"\0\0\0\x03all\0\0\0\x10"
        + b"\x01" * 16
        + b"\0\0\0\x22p-"
        + b"a" * 32
        + b"\xff\xff\xff\xff"
        + b"\0\0\0\x22n-"
        + b"b" * 32
        + b"\0\0\0\0"
    )
    assert len(body) <= wire.OUTCOME_MAX


@pytest.mark.parametrize(
    "tokens",
    [
        (("../all", b"x"),),  # a name the gate would not open as given: never sent
        (("all", b"x" * 65),),
        (("all", b""),) * 4,
    ],
)
def test_a_flush_token_outside_the_wire_is_refused(tokens: Tokens) -> None:
    with pytest.raises(wire.WireError):
        wire.outcome_message(
            0,
            uid=5,
            gid=7,
            perm=0,
            negative_perm=0,
            timeout=3,
            negative_ttl=3,
            payload=b"s",
            tokens=tokens,
        )


def _report(step: int, failed: int, rejected: int, result: int = 0) -> wire.Report:
    return wire.Report(struct.pack("!Iiii", step, failed, rejected, result))


class Lines:
    """A log writer that keeps its lines."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def emit(self, severity: int, message: str) -> None:
        self.lines.append((severity, message))


def _answered() -> Outcome:
    return Outcome(
        "ok", LOG_INFO, key=7, uid=5, timeout=300, negative_ttl=10, payload=b"s", gid=5,
        perm=RESOLVED_KEY_PERM, name="db",
    )  # fmt: skip


def test_a_full_quota_reported_by_the_gate_is_the_handlers_quota_line() -> None:
    log = Lines()
    report = _report(wire.STEP_INSTANTIATE, errno.EDQUOT, errno.EDQUOT)
    assert answer(ReplayKey(report), _answered(), log, 0.0) == 0  # type: ignore[arg-type]
    ((_, line),) = log.lines
    assert "outcome=quota errno=EDQUOT" in line and "key quota is full" in line, line


def test_a_chown_refused_is_a_refusal_line() -> None:
    log = Lines()
    report = _report(wire.STEP_CHOWN, errno.EACCES, errno.EKEYREJECTED)
    answer(ReplayKey(report), _answered(), log, 0.0)  # type: ignore[arg-type]
    ((_, line),) = log.lines
    assert "outcome=refused errno=EKEYREJECTED" in line and "keyctl_chown" in line, line


def test_a_gate_that_rejected_otherwise_is_said_in_the_line() -> None:
    log = Lines()
    report = _report(wire.STEP_INSTANTIATE, errno.EDQUOT, errno.EKEYREJECTED)
    # Not what the handler's rules say: the line is at ERR, and the answer counts as failed.
    assert answer(ReplayKey(report), _answered(), log, 0.0) == 1  # type: ignore[arg-type]
    ((severity, line),) = log.lines
    assert severity == LOG_ERR and "outcome=quota" in line, line


def test_an_answer_the_gate_carried_out_is_the_ok_line() -> None:
    log = Lines()
    answer(ReplayKey(_report(wire.STEP_NONE, 0, 0)), _answered(), log, 0.0)  # type: ignore[arg-type]
    ((severity, line),) = log.lines
    assert severity == LOG_INFO and "outcome=ok" in line and "ttl=300" in line, line


def test_a_refusals_mask_is_within_what_the_gate_allows_and_gives_possessors_nothing() -> None:
    for perm in (NEGATIVE_KEY_PERM, ADMIN_NEGATIVE_KEY_PERM):
        assert not perm & ~wire.NEGATIVE_PERM_ALLOWED
    assert not wire.NEGATIVE_PERM_ALLOWED & POSSESSOR_MASK
    assert not wire.NEGATIVE_PERM_ALLOWED & (PERM_WRITE << USER_SHIFT)


def _fixed(message: bytes) -> tuple[int, ...]:
    return wire.OUTCOME_FIXED.unpack_from(message[wire.HEADER.size :])


def test_a_rejection_sends_the_refused_keys_owner_and_mask() -> None:
    refused = _answered().replace(perm=ADMIN_KEY_PERM).rejected(RefusedError("no"))
    errno_, uid, gid, perm, negative_perm, timeout = _fixed(outcome_message_of(refused, ()))[:6]
    assert (errno_, uid, gid) == (errno.EKEYREJECTED, 5, 5)
    assert (perm, negative_perm, timeout) == (0, ADMIN_NEGATIVE_KEY_PERM, 10)


@pytest.mark.parametrize(
    ("perm", "negative"),
    [(RESOLVED_KEY_PERM, NEGATIVE_KEY_PERM), (ADMIN_KEY_PERM, ADMIN_NEGATIVE_KEY_PERM)],
)
def test_an_answer_sends_the_mask_its_key_gets_should_the_kernel_refuse_it(
    perm: int, negative: int
) -> None:
    # The handler's answer() rejects a key the kernel refused with Outcome.rejected's mask.
    answered = _answered().replace(perm=perm)
    assert answered.rejected(RefusedError("instantiate failed")).perm == negative
    assert _fixed(outcome_message_of(answered, ()))[3:5] == (perm, negative)
