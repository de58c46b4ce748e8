"""The one answer path (resolver/answer.py) against the in-memory kernel stand-in."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from kmskeys.contract import RESOLVED_KEY_PERM
from kmskeys.errors import KeyRevokedError, QuotaExceededError
from resolver.answer import answer, answer_unanswered, log_error, log_writer
from resolver.config import parse
from resolver.errors import UnavailableError
from resolver.log import LOG_ERR, LOG_INFO, LOG_WARNING
from resolver.outcome import Outcome
from tests.backends.contract import MemoryKey, RecordingLog

pytestmark = pytest.mark.unit


def _ok(payload: bytes = b"kmst-answer") -> Outcome:
    return Outcome(
        "ok",
        LOG_INFO,
        key=7,
        uid=1000,
        timeout=300,
        negative_ttl=10,
        payload=payload,
        gid=1000,
        perm=RESOLVED_KEY_PERM,
        name="app/db",
        user="alice",
        details=(("source", "inline"), ("mode", "direct")),
        timings="decrypt:9",
    )


def test_an_answer_sets_the_key_up_before_instantiating_and_logs_once() -> None:
    key, log = MemoryKey(7), RecordingLog()
    assert answer(key, _ok(), log, time.monotonic()) == 0
    assert key.calls == ["chown", "setperm", "set_timeout", "instantiate"]
    assert (key.owner, key.perm, key.timeout) == ((1000, 1000), RESOLVED_KEY_PERM, 300)
    ((severity, line),) = log.lines
    assert severity == LOG_INFO and "kmst-answer" not in line
    assert line.startswith("uid=1000 user=alice name=app/db key=7 outcome=ok source=inline ")
    assert " ttl=300 ms=" in line and line.endswith(" t=decrypt:9")


class QuotaKey(MemoryKey):
    def instantiate(self, payload: str | bytes, keyring: int = 0) -> None:
        self._settle("instantiate")
        raise QuotaExceededError("quota", errno=errno.EDQUOT)


def test_a_full_quota_becomes_an_edquot_rejection() -> None:
    key, log = QuotaKey(7), RecordingLog()
    assert answer(key, _ok(), log, time.monotonic()) == 0
    assert key.rejected == (10, errno.EDQUOT)
    ((severity, line),) = log.lines
    assert severity == LOG_WARNING and " outcome=quota " in line and " errno=EDQUOT " in line


def test_a_payload_the_kernel_refuses_becomes_a_refusal() -> None:
    key, log = MemoryKey(7), RecordingLog()
    answer(key, _ok(b"x" * 32768), log, time.monotonic())
    assert key.rejected == (10, errno.EKEYREJECTED)
    assert "instantiate failed" in log.lines[0][1]


class AnsweredKey(MemoryKey):
    def assume_authority(self) -> None:
        raise KeyRevokedError("answered", errno=errno.EKEYREVOKED)

    def reject(self, timeout: int, error: int, keyring: int = 0) -> None:
        raise KeyRevokedError("answered", errno=errno.EKEYREVOKED)


def test_a_failed_reject_is_logged_at_err() -> None:
    log = RecordingLog()
    refused = _ok().rejected(UnavailableError("KMS down"))
    assert answer(AnsweredKey(7), refused, log, time.monotonic()) == 1
    ((severity, line),) = log.lines
    assert severity == LOG_ERR and "KMS down; reject failed" in line and " errno=EAGAIN " in line


def test_the_backstop_answers_only_an_unanswered_key() -> None:
    error = UnavailableError("resolver worker killed by signal SIGKILL before answering")
    outcome = _ok().rejected(error)
    log = RecordingLog()
    assert answer_unanswered(AnsweredKey(7), outcome, log, time.monotonic()) == 0
    assert log.lines == []
    key = MemoryKey(7)
    assert answer_unanswered(key, outcome, log, time.monotonic()) == 1
    assert key.rejected == (10, errno.EAGAIN)
    ((severity, line),) = log.lines
    assert severity == LOG_ERR and "killed by signal SIGKILL" in line


def test_the_log_writer_comes_from_the_config_in_one_place(tmp_path: Path) -> None:
    config = parse({"syslog_socket": str(tmp_path / "log"), "syslog_facility": "daemon"})
    writer = log_writer(config)
    assert (writer.socket_path, writer.facility) == (tmp_path / "log", 3)
    found = log_writer(found=(tmp_path / "other", "auth"))
    assert (found.socket_path, found.facility) == (tmp_path / "other", 4)
    default = log_writer()
    assert (str(default.socket_path), default.facility) == ("/dev/log", 10)
    log = RecordingLog()
    log_error(log, "bad argv")
    assert log.lines == [(LOG_ERR, 'outcome=error reason="bad argv"')]
