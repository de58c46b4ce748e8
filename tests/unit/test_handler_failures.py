"""How the handler classes a failure: once its deadline has fired, always EAGAIN (F7)."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from resolver.errors import DeadlineExceeded, RefusedError, UnavailableError
from resolver.handler import HandleArgs, Handler

pytestmark = pytest.mark.unit


def _handler() -> Handler:
    args = HandleArgs(Path("/nonexistent.toml"), 1, "kms:x", 0, 0, 0, 0, 0)
    return Handler(args, time.monotonic())


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("raised inside an import while the signal was handled"),
        TypeError("class creation cut short"),
        RefusedError("KMS InvalidCiphertextException"),
        ImportError("partially initialized module", name="botocore"),
    ],
    ids=["runtime", "type", "refusal", "import"],
)
def test_after_the_watchdog_fired_every_failure_is_eagain(exc: Exception) -> None:
    handler = _handler()
    handler.watchdog.fired = True
    failure = handler.failure(exc)
    assert isinstance(failure, UnavailableError)
    assert failure.answer_errno == errno.EAGAIN
    assert failure.reason.startswith("deadline exceeded (")


def test_the_deadline_itself_is_eagain() -> None:
    failure = _handler().failure(DeadlineExceeded())
    assert isinstance(failure, UnavailableError) and "deadline" in failure.reason


def test_before_the_deadline_a_bug_is_a_refusal_and_a_missing_module_is_eagain() -> None:
    handler = _handler()
    bug = handler.failure(RuntimeError("a bug"))
    assert isinstance(bug, RefusedError) and bug.reason == "internal error: RuntimeError"
    missing = handler.failure(ImportError("No module named 'botocore'", name="botocore"))
    assert isinstance(missing, UnavailableError)
    assert "missing dependency botocore" in missing.reason
    assert "pip install 'kmskeys[resolver]'" in missing.reason
    kept = RefusedError("policy")
    assert handler.failure(kept) is kept


def test_the_watchdog_marks_itself_fired() -> None:
    handler = _handler()
    with pytest.raises(DeadlineExceeded), handler.watchdog.armed(time.monotonic() + 0.01):
        time.sleep(1)
    assert handler.watchdog.fired
