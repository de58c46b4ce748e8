"""Suite-wide fixtures: tier prerequisites (fail, never skip), a fresh session keyring, and the
checks that hold for every test: other uids reach the checkout, nothing reaches IMDS from the
host's network, no key the session named outlives it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import slowbuild
from tests.support.admin_group import removed_if_created
from tests.support.imds_guard import GuardUnavailable, HostImdsGuard
from tests.support.leftover_keys import leftover_after_gc
from tests.support.names import issued
from tests.support.prereqs import CHECKS, missing_for
from tests.support.reach import header as reach_header
from tests.support.reach import unreachable
from tests.support.requester import Requester, header, requester_modes

_missing_cache: dict[str, list[str]] = {}
# The session's IMDS guard (tests/support/imds_guard.py), or why there is none.
_imds_guard: HostImdsGuard | None = None
_imds_guard_missing = "not set up"


@pytest.fixture(scope="session", autouse=True)
def _no_keys_left() -> Iterator[None]:
    """Fail the session if a key named by it outlives it (set up first, so checked last, after
    every other session fixture has cleaned up): a test that put a key in a keyring that
    outlives it (root's user or persistent keyring) and did not remove it, even on failure."""
    yield
    left = leftover_after_gc(issued())
    if left:
        pytest.fail(
            "keys this session created are still alive in keyrings that outlive it (a test "
            "must remove what it links, in a finally): " + "; ".join(left),
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def _admin_group_cleanup() -> Iterator[None]:
    """The kmskeys-admin group the tiers' installs create goes when the session ends."""
    with removed_if_created():
        yield


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once, in one line, if processes of other uids cannot use this checkout; then
    guard the host's network against IMDS probes (before any fixture starts a process)."""
    global _imds_guard, _imds_guard_missing
    problem = unreachable()
    if problem:
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)
    try:
        _imds_guard = HostImdsGuard().install()
    except GuardUnavailable as exc:
        _imds_guard_missing = str(exc)


# Seconds of setup, call and teardown per tier (the directory below tests/), for the summary.
_tier_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    tier = report.nodeid.split("/")[1] if report.nodeid.startswith("tests/") else "?"
    _tier_seconds[tier] = _tier_seconds.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line: where `make test`'s time goes, tier by tier (its budget is 15 minutes)."""
    if _tier_seconds:
        spent = sorted(_tier_seconds.items(), key=lambda kv: -kv[1])
        terminalreporter.write_line(
            "time per tier: " + ", ".join(f"{tier} {secs:.0f} s" for tier, secs in spent)
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that wait for a prerequisite built in background run last."""
    slowbuild.schedule(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the slow prerequisites the collected tests need (tests/support/slowbuild.py)."""
    slowbuild.start(session.items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The IMDS guard's table and cgroup go with the session, and any build still running."""
    slowbuild.stop()
    if _imds_guard is not None:
        _imds_guard.remove()


def pytest_report_header(config: pytest.Config) -> list[str]:
    """What the session's upcall probe found, which kinds of requester the tests use, and how
    other uids reach the checkout."""
    off = f"imds guard: off (missing: {_imds_guard_missing})"
    guard = _imds_guard.header() if _imds_guard else off
    return [*header(), *reach_header(), guard]


@pytest.fixture(autouse=True)
def _no_imds_from_the_host(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose processes sent a packet to IMDS from the host's network (dropped by the
    guard). Only the guard's own test, which takes `imds_guard`, probes it on purpose."""
    if _imds_guard is None or "imds_guard" in request.fixturenames:
        yield
        return
    before = _imds_guard.imds_packets()
    yield
    sent = _imds_guard.imds_packets() - before
    if sent:
        pytest.fail(
            f"{sent} packet(s) to the instance-metadata address on the host's network (the "
            "suite's guard refused them): run what probes IMDS (doctor, firewall status) in a "
            "network namespace the test creates (`unshare --net`, as_user(own_network=True))",
            pytrace=False,
        )


@pytest.fixture
def imds_guard() -> HostImdsGuard:
    """The session's IMDS guard, for the test that shows it works (fails where there is none)."""
    if _imds_guard is None:
        pytest.fail(f"the IMDS guard could not be set up; missing: {_imds_guard_missing}")
    return _imds_guard


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking `requester` runs once per kind of requester this session exercises."""
    if "requester" in metafunc.fixturenames:
        kinds = [Requester(mode) for mode in requester_modes()]
        metafunc.parametrize("requester", kinds, ids=[kind.mode for kind in kinds])


@pytest.fixture(autouse=True)
def _tier_prerequisites(request: pytest.FixtureRequest) -> None:
    """Fail (not skip) a test whose tier this machine cannot run, saying what is missing."""
    for tier in CHECKS:
        if request.node.get_closest_marker(tier) is None:
            continue
        if tier not in _missing_cache:
            _missing_cache[tier] = missing_for(tier)
        if _missing_cache[tier]:
            pytest.fail(
                f"tier '{tier}' cannot run here; missing: " + "; ".join(_missing_cache[tier]),
                pytrace=False,
            )


@pytest.fixture
def session_keyring() -> Iterator[object]:
    """Run the test inside its own new anonymous session keyring, emptied afterwards."""
    from kmskeys import Keyring

    _assert_no_thread_or_process_keyring()
    ring = Keyring.join_session()
    try:
        yield ring
    finally:
        # A test that joined another session has already dropped this keyring (the kernel frees
        # it with its keys); otherwise empty it, then leave it for a new empty one.
        if Keyring.session() == ring:
            ring.clear()
        Keyring.join_session()


def _assert_no_thread_or_process_keyring() -> None:
    # request_key(2) puts new keys in the thread or process keyring ahead of the session keyring,
    # and such a keyring also hides negative keys from searches: keys would outlive the test and
    # negative caching would silently stop working. Code that needs one must run in a child.
    from kmskeys import KeyNotFoundError, keyutils

    for spec, what in (
        (keyutils.KEY_SPEC_THREAD_KEYRING, "thread"),
        (keyutils.KEY_SPEC_PROCESS_KEYRING, "process"),
    ):
        try:
            keyutils.keyctl_get_keyring_ID(spec, False)
        except KeyNotFoundError:
            continue
        pytest.fail(f"the pytest process has a {what} keyring: an earlier test created one")
