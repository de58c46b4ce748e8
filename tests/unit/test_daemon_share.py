"""The resolver daemon's weight in the scheduler (resolver/daemon.py claim_cpu_share): its own
session's autogroup is raised, never a session it shares with others."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from resolver.daemon import AUTOGROUP, AUTOGROUP_NICE, claim_cpu_share

pytestmark = pytest.mark.unit


def _in_child(func: Callable[[], object], *, own_session: bool) -> tuple[object, str]:
    """func()'s result in a forked child (a session leader if `own_session`), and the child's
    /proc/PID/autogroup as read by the parent before the child exits ("" if none)."""
    result_r, result_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            os.close(result_r)
            os.close(go_w)
            if own_session:
                os.setsid()
            os.write(result_w, json.dumps(func()).encode() + b"\n")
            os.read(go_r, 1)  # stay alive until the parent has read our autogroup
        except BaseException:
            code = 1
        os._exit(code)
    os.close(result_w)
    os.close(go_r)
    try:
        with os.fdopen(result_r) as reader:
            line = reader.readline()
            try:
                group = Path(f"/proc/{pid}/autogroup").read_text()
            except FileNotFoundError:
                group = ""
    finally:
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and line, "the child failed"
    return json.loads(line), group


def test_a_session_leader_weighs_its_own_session(tmp_path: Path) -> None:
    autogroup = tmp_path / "autogroup"
    autogroup.write_text("")
    problem, _ = _in_child(lambda: claim_cpu_share(autogroup), own_session=True)
    assert problem is None
    assert autogroup.read_text() == str(AUTOGROUP_NICE)


def test_a_daemon_in_a_shared_session_leaves_it_alone(tmp_path: Path) -> None:
    autogroup = tmp_path / "autogroup"
    autogroup.write_text("untouched")
    problem, _ = _in_child(lambda: claim_cpu_share(autogroup), own_session=False)
    assert isinstance(problem, str) and "not the leader of its own session" in problem
    assert autogroup.read_text() == "untouched"


def test_a_kernel_without_autogroups_is_no_problem(tmp_path: Path) -> None:
    problem, _ = _in_child(lambda: claim_cpu_share(tmp_path / "absent"), own_session=True)
    assert problem is None
    assert not (tmp_path / "absent").exists()


def test_the_kernel_weighs_the_session_as_said() -> None:
    # The real /proc/self/autogroup (sched(7)): root may lower a session's nice. A kernel built
    # without autogroups has no such file, and then there is nothing to weigh.
    problem, group = _in_child(claim_cpu_share, own_session=True)
    assert problem is None
    if AUTOGROUP.exists():
        assert group.split()[-2:] == ["nice", str(AUTOGROUP_NICE)], group
    else:
        assert group == ""
