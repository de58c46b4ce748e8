"""Who asked, through the real upcall: resolver.requester run as the handler runs it.

Each test installs tests/support/identify_handler.py as a request-key rule (it identifies the
requester and instantiates the key with what it saw, or rejects it), puts real processes into
real cgroup v2 groups (tests/support/cgroups.py) and requests as root or as an emulated
unprivileged uid (tests/support/requester.py). docs/security.md, "Secrets bound to a program",
has the kernel facts these tests check.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmskeys import keyutils
from tests.support import cgroups
from tests.support.identity import IdentityRule, identity_rule, request
from tests.support.requester import NOBODY, Requester, Resident, Steps, entry

pytestmark = pytest.mark.upcall

REPO = Path(__file__).resolve().parents[2]
PYTHON = os.path.realpath(sys.executable)


@pytest.fixture
def cg() -> Iterator[cgroups.Slice]:
    """A unique slice with app.service and other.service; fails (never skips) if impossible."""
    lacking = cgroups.missing()
    if lacking:
        pytest.fail("cgroup v2 tests cannot run here; missing: " + "; ".join(lacking))
    with cgroups.slice_with("app.service", "other.service") as made:
        yield made


@pytest.fixture
def rule(tmp_path: Path) -> Iterator[IdentityRule]:
    """The identification rule under a unique prefix."""
    with identity_rule(tmp_path) as installed:
        yield installed


def _in_cgroup(
    cg: cgroups.Slice, cgroup: str, user: int | str, mode: str | None, step: object
) -> object:
    """Run `step` in a child as `user`, moved into `cgroup` before it runs."""
    with Steps(user, [step], mode=mode) as child:  # type: ignore[list-item, arg-type]
        assert child.ready() == {"ok": None}
        cg.move(child.pid, cgroup)
        return child.run(0)


@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
def test_a_requester_is_identified_by_its_unit(
    cg: cgroups.Slice, rule: IdentityRule, requester: Requester, user: int
) -> None:
    for unit in ("app.service", "other.service"):
        name = f"unit-{unit.split('.')[0]}"
        got = _in_cgroup(
            cg, cg.path(unit), user, requester.mode, lambda n=name: request(rule.description(n))
        )
        assert isinstance(got, dict) and "ok" in got, got
        seen = got["ok"]
        assert seen["unit"] == unit
        assert seen["cgroup"] == seen["trusted"] == cg.path(unit)
        assert seen["uid"] == user
        assert seen["tid"] == seen["tgid"]
        assert seen["exe"] == PYTHON and seen["exe_problem"] is None
        # The log line names what was seen, quoting nothing plain.
        assert f"unit={unit}" in seen["summary"] and f"cgroup={cg.path(unit)}" in seen["summary"]


def test_a_unit_policy_admits_its_unit_and_refuses_another_of_the_same_uid(
    cg: cgroups.Slice, rule: IdentityRule, requester: Requester
) -> None:
    rule.policy(allow_units=["app.service"])
    allowed = _in_cgroup(
        cg, cg.path("app.service"), NOBODY, requester.mode, lambda: request(rule.description("a"))
    )
    assert isinstance(allowed, dict) and allowed["ok"]["unit"] == "app.service"  # type: ignore[index]
    refused = _in_cgroup(
        cg, cg.path("other.service"), NOBODY, requester.mode, lambda: request(rule.description("b"))
    )
    assert refused == {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}
    verdict = rule.verdict("b")
    assert verdict["answered"] == "rejected"
    assert verdict["reason"] == "program policy (unit): unit other.service is not in allow_units"


def test_the_pid_is_the_requesting_thread(
    cg: cgroups.Slice, rule: IdentityRule, requester: Requester
) -> None:
    def from_a_thread() -> object:
        out: dict[str, object] = {}

        def run() -> None:
            out["tid"] = threading.get_native_id()
            out["seen"] = request(rule.description("thread"))

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        return {**out, "pid": os.getpid()}

    got = _in_cgroup(cg, cg.path("app.service"), NOBODY, requester.mode, from_a_thread)
    assert isinstance(got, dict) and "ok" in got, got
    seen = got["ok"]["seen"]
    assert seen["tid"] == got["ok"]["tid"] != got["ok"]["pid"]
    assert seen["tgid"] == got["ok"]["pid"]
    assert seen["unit"] == "app.service"


def test_a_requester_in_a_child_pid_namespace_is_named_by_its_global_pid(
    cg: cgroups.Slice, rule: IdentityRule
) -> None:
    code = (
        "import json; from kmskeys import Keyring; Keyring.join_session(); "
        "from tests.support.identity import request; "
        f"print(json.dumps(request({rule.description('pidns')!r})))"
    )
    path = cg.path("app.service")
    procs = cg.directory(path) / "cgroup.procs"
    # The shell moves itself into the unit, then becomes unshare, whose child is the requester.
    enter = 'echo $$ > "$1" && shift && exec "$@"'
    done = subprocess.run(
        ["sh", "-c", enter, "sh", procs, "unshare", "--pid", "--fork", sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    seen = json.loads(done.stdout)
    outer, inner = seen["nspid"]  # two pid namespaces: the kernel's view first
    assert seen["tid"] == outer != inner
    assert inner == 1  # unshare's forked child, which execs python, is init of the namespace
    assert seen["cgroup"] == path and seen["unit"] == "app.service"


def _forged_line(auth: int, target: int, uid: int, pid: int) -> bytes:
    """A /proc/keys line as the kernel prints the authorization key, naming `pid`."""
    return b"%08x I------     1 perm 1b010000 %5d %5d .request_ key:%x pid:%d ci:0" % (
        auth,
        uid,
        uid,
        target,
        pid,
    )


def _forge(held: dict[str, int], rule: IdentityRule, pid: int | None) -> object:
    """As another process of the uid: a key whose description forges the authorization key's
    line (viewable by others), naming `pid` (None: itself)."""
    line = _forged_line(held["auth"], held["target"], NOBODY, pid or os.getpid())
    # The kernel appends ": DATALEN" to a user key's line: a last line takes it, so the forged
    # one is exactly what the kernel prints for the real key.
    desc = rule.description("forge").encode() + b"\n" + line + b"\n#"
    serial = keyutils.add_key(b"user", desc, b"x", keyutils.KEY_SPEC_SESSION_KEYRING)
    keyutils.keyctl_setperm(serial, 0x3F010001)  # possessor all, owner and other VIEW
    return os.getpid()


def _asking(child: Steps, result: dict[str, object], key: str) -> threading.Thread:
    asking = threading.Thread(target=lambda: result.update({key: child.run(0)}))
    asking.start()
    return asking


def test_a_forged_line_naming_a_task_that_waits_for_no_upcall_changes_nothing(
    cg: cgroups.Slice, rule: IdentityRule, requester: Requester
) -> None:
    """Another process of the uid, in another unit, forges the authorization key's line (a key
    description with a newline, viewable by others) naming itself while the handler waits: the
    kernel's own line is still there, and only a task waiting for an upcall can have asked."""
    name = "hold-forged"
    with Steps(NOBODY, [lambda: request(rule.description(name))], mode=requester.mode) as child:
        assert child.ready() == {"ok": None}
        cg.move(child.pid, cg.path("app.service"))
        result: dict[str, object] = {}
        asking = _asking(child, result, "got")
        try:
            held = rule.held(name)
            with Resident(NOBODY, lambda: _forge(held, rule, None), mode=requester.mode) as forger:
                assert isinstance(forger.result, dict) and "ok" in forger.result, forger.result
                cg.move(forger.pid, cg.path("other.service"))
                lines = Path("/proc/keys").read_bytes().split(b"\n")
                forged = [x for x in lines if x.startswith(b"%08x " % held["auth"])]
                assert _forged_line(held["auth"], held["target"], NOBODY, forger.pid) in forged
                rule.release(name)
                asking.join(timeout=30)
        finally:
            rule.release(name)
            asking.join(timeout=30)
    got = result["got"]
    assert isinstance(got, dict) and "ok" in got, got
    assert got["ok"]["tid"] == child.pid and got["ok"]["unit"] == "app.service"


def test_a_forged_line_naming_another_waiting_requester_is_unclear_not_refused(
    cg: cgroups.Slice, rule: IdentityRule, requester: Requester
) -> None:
    """A forgery that names a task which does wait for an upcall (another request of the uid,
    held) cannot be told from the kernel's line: EAGAIN, never a cached refusal and never the
    other task's identity."""
    first, second = "hold-first", "hold-second"
    with (
        Steps(NOBODY, [lambda: request(rule.description(first))], mode=requester.mode) as one,
        Steps(NOBODY, [lambda: request(rule.description(second))], mode=requester.mode) as two,
    ):
        assert one.ready() == two.ready() == {"ok": None}
        cg.move(one.pid, cg.path("app.service"))
        cg.move(two.pid, cg.path("other.service"))
        result: dict[str, object] = {}
        asking = [_asking(one, result, first), _asking(two, result, second)]
        try:
            held = rule.held(first)
            rule.held(second)
            with Resident(NOBODY, lambda: _forge(held, rule, two.pid), mode=requester.mode):
                rule.release(first)
                asking[0].join(timeout=30)
        finally:
            rule.release(first)
            rule.release(second)
            for thread in asking:
                thread.join(timeout=30)
    assert result[first] == {"error": "TemporarilyUnavailableError", "errno": errno.EAGAIN}
    verdict = rule.verdict(first)
    assert verdict["error"] == "IdentityUnclearError" and verdict["answered"] == "rejected"
    assert "name 2 requesters" in str(verdict["reason"])
    assert isinstance(result[second], dict) and "ok" in result[second]


def test_a_forged_line_the_handler_cannot_view_changes_nothing(
    cg: cgroups.Slice, rule: IdentityRule, requester: Requester
) -> None:
    """The handler reads /proc/keys as an id that owns no keys: a forgery only its owner may
    view never reaches it, and the requester is identified as it is."""
    name = "hold-unseen"
    with Steps(NOBODY, [lambda: request(rule.description(name))], mode=requester.mode) as child:
        assert child.ready() == {"ok": None}
        cg.move(child.pid, cg.path("app.service"))
        result: dict[str, object] = {}
        asking = threading.Thread(target=lambda: result.update(got=child.run(0)))
        asking.start()
        try:
            held = rule.held(name)

            def forge() -> object:
                line = _forged_line(held["auth"], held["target"], NOBODY, os.getpid())
                desc = rule.description("forge").encode() + b"\n" + line
                return keyutils.add_key(b"user", desc, b"x", keyutils.KEY_SPEC_SESSION_KEYRING)

            with Resident(NOBODY, forge, mode=requester.mode) as forger:
                assert isinstance(forger.result, dict) and "ok" in forger.result, forger.result
                rule.release(name)
                asking.join(timeout=30)
        finally:
            rule.release(name)
            asking.join(timeout=30)
    got = result["got"]
    assert isinstance(got, dict) and "ok" in got, got
    assert got["ok"]["tid"] == child.pid and got["ok"]["unit"] == "app.service"


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_a_requester_killed_during_resolution_gets_no_key(
    cg: cgroups.Slice, rule: IdentityRule, user: str
) -> None:
    name = f"hold-killed-{user}"
    with Steps(user, [lambda: request(rule.description(name))]) as child:
        assert child.ready() == {"ok": None}
        cg.move(child.pid, cg.path("app.service"))
        result: dict[str, object] = {}
        asking = threading.Thread(target=lambda: result.update(got=child.run(0)))
        asking.start()
        try:
            held = rule.held(name)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            rule.release(name)
            asking.join(timeout=30)
    assert result["got"] == {"error": "ChildDied"}
    verdict = rule.verdict(name)
    assert verdict["error"] == "RequesterGoneError", verdict
    assert verdict["answered"] == "rejected" and verdict["errno"] == errno.EAGAIN
    if entry(user).pw_uid == 0:
        # Root may view its own keys: the key is gone with the session, or negative.
        lines = Path("/proc/keys").read_bytes().split(b"\n")
        left = [x for x in lines if x.startswith(b"%08x " % held["target"])]
        assert all(x.split()[1].startswith(b"---") or b"N" in x.split()[1] for x in left), left


def _copy_program(source: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    shutil.copy2(source, target)
    return target


def test_an_executable_swapped_during_the_request_does_not_pass(
    rule: IdentityRule, tmp_path: Path
) -> None:
    keyctl = shutil.which("keyctl")
    assert keyctl is not None, "keyctl(1) is needed (apt-get install keyutils)"
    program = _copy_program(keyctl, tmp_path / "bin" / "kmst-keyctl")
    rule.policy(allow_exe=[str(program)])

    def ask(name: str) -> subprocess.Popen[bytes]:
        argv = ["keyctl", "session", "-", str(program), "request2", "user"]
        return subprocess.Popen(
            [*argv, rule.description(name), "", "@s"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    same = ask("hold-same")
    rule.held("hold-same")
    rule.release("hold-same")
    assert same.wait(timeout=30) == 0
    assert rule.verdict("hold-same")["identity"]["exe"] == str(program)  # type: ignore[index]

    swapped = ask("hold-swapped")
    rule.held("hold-swapped")
    os.replace(_copy_program(keyctl, tmp_path / "other" / "kmst-keyctl"), program)
    rule.release("hold-swapped")
    assert swapped.wait(timeout=30) != 0
    verdict = rule.verdict("hold-swapped")
    assert verdict["error"] == "RefusedError"
    assert str(verdict["reason"]).startswith(f'program policy (exe): exe "{program} (deleted)":')


def test_names_below_a_delegated_cgroup_are_not_trusted(
    cg: cgroups.Slice, rule: IdentityRule, requester: Requester
) -> None:
    """A cgroup a non-root uid may write (systemd's Delegate=, user@UID.service) is where
    root's naming ends: a group its owner calls nginx.service inside it is not that unit."""
    delegated = cg.sub(f"/{cg.name}", "deleg.service", owner=NOBODY)
    inner = cg.sub(delegated, "nginx.service")
    rule.policy(allow_units=["nginx.service"])
    got = _in_cgroup(cg, inner, NOBODY, requester.mode, lambda: request(rule.description("dlg")))
    assert got == {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}
    verdict = rule.verdict("dlg")
    assert verdict["reason"] == "program policy (unit): unit deleg.service is not in allow_units"

    rule.policy(allow_units=["deleg.service"])
    got = _in_cgroup(cg, inner, NOBODY, requester.mode, lambda: request(rule.description("dlg2")))
    assert isinstance(got, dict) and "ok" in got, got
    seen = got["ok"]
    assert (seen["unit"], seen["trusted"], seen["cgroup"]) == ("deleg.service", delegated, inner)
    assert f"delegated_at={delegated}" in seen["summary"]
