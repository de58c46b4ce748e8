"""The handler's supervisor when the system has no process to spare."""

from __future__ import annotations

import errno

import pytest

from resolver import supervise

pytestmark = pytest.mark.unit


def test_failed_fork_handles_in_process_instead_of_dying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_fork() -> int:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    calls: list[tuple[list[str], float | None]] = []

    def handle(argv: list[str], started: float | None = None) -> int:
        calls.append((argv, started))
        return 0

    monkeypatch.setattr(supervise.os, "fork", no_fork)
    # In process: this must not make the test runner itself undumpable for the rest of the run.
    monkeypatch.setattr(supervise, "disable_core_dumps", lambda: None)
    monkeypatch.setattr(supervise.handler, "main", handle)
    argv = ["--config", "/nonexistent.toml", "1", "kms:x", "", "0", "0", "0", "0", "0"]
    assert supervise.supervise(argv) == 0
    assert len(calls) == 1
    assert calls[0][0] == argv
    assert isinstance(calls[0][1], float)  # the deadline still counts from the real start
