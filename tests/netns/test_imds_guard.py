"""The suite's IMDS guard catches a real probe from the host's network, and only the session's.

Every other test fails if its processes send a packet to IMDS from the host's network
(tests/conftest.py). Here the guard is shown to work: first on a loopback canary (so that, if
the cgroup match were broken, nothing would leave the machine), then with doctor's own probes,
as root and as nobody, which the guard counts and refuses. A process outside the session's cgroup
is neither counted nor blocked.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kmskeys import imds
from kmskeys.upcall_probe import nobody
from tests.support.imds_guard import CANARY, HostImdsGuard, own_network
from tests.support.requester import as_user

pytestmark = pytest.mark.netns


def _connect(port: int) -> int:
    """errno of a connect to the canary address (0: connected)."""
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((CANARY, port))


def _in_child(func: Callable[[], object], *, leave_for: Path | None = None) -> object:
    """func() in a child of this session; with `leave_for`, the child first moves to that
    cgroup (outside the guard's), as another session's process would be."""

    def run() -> object:
        if leave_for is not None:
            (leave_for / "cgroup.procs").write_text(str(os.getpid()))
        return func()

    return as_user("root", run, session="inherit")


@contextmanager
def _listening() -> Iterator[int]:
    """A listener on the canary address; its port."""
    with socket.socket() as server:
        server.bind((CANARY, 0))
        server.listen(8)
        yield server.getsockname()[1]


def test_the_canary_shows_the_guard_matches_this_session_only(imds_guard: HostImdsGuard) -> None:
    assert imds_guard.cgroup is not None
    with _listening() as port:
        before = imds_guard.counts()["canary"]
        # A process of this session: reset by the guard, though something listens.
        assert _in_child(lambda: _connect(port)) == {"ok": errno.ECONNREFUSED}
        assert imds_guard.counts()["canary"] == before + 1
        # Another cgroup's process (another session on this machine): untouched, connects.
        away = imds_guard.cgroup.parent
        assert _in_child(lambda: _connect(port), leave_for=away) == {"ok": 0}
        assert imds_guard.counts()["canary"] == before + 1


def _sent(result: imds.ProbeResult) -> bool:
    """Did this probe make a packet? Not if the host has no route to the address at all."""
    return result.detail not in {"unreachable", "no route", "no ipv6"}


def test_doctors_probes_on_the_host_network_are_counted_and_dropped(
    imds_guard: HostImdsGuard,
) -> None:
    # Only once the canary shows the match works does anything probe IMDS on purpose.
    with _listening() as port:
        assert _in_child(lambda: _connect(port)) == {"ok": errno.ECONNREFUSED}
    counters = {imds.IMDS_IPV4: "imds4", imds.IMDS_IPV6: "imds6"}
    for who, probe in (
        ("root", lambda: imds.probe(0.5)),
        ("nobody", lambda: imds.probe_as_user(*nobody(), 0.5)),
    ):
        before = imds_guard.counts()
        results = probe()
        after = imds_guard.counts()
        assert results is not None, who
        assert any(_sent(r) for r in results), f"{who}: no route to IMDS at all: {results}"
        for result in results:
            rose = after[counters[result.address]] - before[counters[result.address]]
            if _sent(result):
                assert (result.detail, rose >= 1) == ("refused", True), (who, result)
            else:
                assert rose == 0, (who, result)


def test_a_probe_in_a_network_namespace_of_its_own_sends_nothing(
    imds_guard: HostImdsGuard,
) -> None:
    before = imds_guard.imds_packets()

    def probe() -> list[bool]:
        own_network()
        return [_sent(r) for r in imds.probe(0.5)]

    assert as_user("root", probe, session="inherit") == {"ok": [False, False]}
    assert imds_guard.imds_packets() == before
