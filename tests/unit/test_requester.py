"""resolver.requester on hostile input: forged /proc/keys lines, odd cgroup files, a fake /proc.

The real upcall, real cgroups and the kernel facts are tests/upcall/test_requester_identity.py;
here each parser meets what a requester could make the kernel print, and what it could not.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kmskeys.contract import AUTH_LINE_MAX, AUTH_LINES_MAX
from resolver.requester import (
    AuthRecord,
    AuthView,
    IdentityError,
    IdentityUnclearError,
    Requester,
    RequesterGoneError,
    auth_lines,
    auth_records,
    check_alive,
    identify,
)
from resolver.task import cgroup2_mount, cgroup_path, inspect_task, trusted_depth, unit_of

pytestmark = pytest.mark.unit

AUTH, TARGET = 0x11794E12, 0x3595579C
# Lines as this machine's kernel printed them (checked on 6.18).
REAL = b"11794e12 I------     4 perm 1b010000     0     0 .request_ key:3595579c pid:19014 ci:0"
OTHER = b"0f155b0c I--Q---     1 perm 3f030000     0     0 keyring   _ses: empty"
USER_KEY = b"1350c385 I--Q---     1  59m 3f010000  1000  1000 user      app:db-password: 32"


def _keys(*lines: bytes) -> bytes:
    return b"\n".join(lines) + b"\n"


def auth_record(proc_keys: bytes, auth: int, target: int, uid: int | None = None) -> AuthRecord:
    """The one requester the lines for `auth` name (as the pipeline reads them)."""
    found = auth_records(AuthView(auth, auth_lines(proc_keys, auth), 0, ""), target, uid)
    assert len(found) == 1, found
    return found[0]


def _forging(line: bytes, serial: bytes = b"2a000001") -> bytes:
    """A user key whose description ends in a newline and `line`, as /proc/keys prints it."""
    return serial + b" I--Q---     1 perm 3f010001  1000  1000 user      x:\n" + line + b"\n#: 1"


def test_the_authorization_keys_own_line_names_the_thread() -> None:
    found = auth_record(_keys(OTHER, REAL, USER_KEY), AUTH, TARGET)
    assert found == AuthRecord(tid=19014, uid=0)


def test_a_non_root_requesters_line_names_its_uid() -> None:
    line = REAL.replace(b"    0     0 .request_", b"65534 65534 .request_")
    assert auth_record(_keys(line), AUTH, TARGET) == AuthRecord(tid=19014, uid=65534)


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_forged_copy_of_the_line_only_adds_a_requester_to_judge(where: str) -> None:
    """The kernel's line is always there: a forgery cannot hide it, only name someone else
    beside it, and the pipeline must then judge both (resolver/binding.py)."""
    forged = _forging(REAL.replace(b"pid:19014", b"pid:1"))
    lines = (forged, REAL) if where == "before" else (REAL, forged)
    view = AuthView(AUTH, auth_lines(_keys(OTHER, *lines), AUTH), 0, "")
    assert set(auth_records(view, TARGET)) == {AuthRecord(19014, 0), AuthRecord(1, 0)}


def test_an_exact_copy_of_the_line_changes_nothing() -> None:
    view = AuthView(AUTH, auth_lines(_keys(_forging(REAL), REAL), AUTH), 0, "")
    assert auth_records(view, TARGET) == (AuthRecord(19014, 0),)


def test_a_forged_line_beside_the_kernels_that_is_not_its_shape_is_unclear() -> None:
    """Not a refusal (cached): EAGAIN, so that a forgery never makes one stick."""
    forged = _forging(REAL.replace(b"pid:19014 ci:0", b"pid:1 ci:0 x"))
    with pytest.raises(IdentityUnclearError, match="1 not the kernel's"):
        auth_records(AuthView(AUTH, auth_lines(_keys(forged, REAL), AUTH), 0, ""), TARGET)


def test_too_many_lines_are_unclear_unexamined() -> None:
    forged = [_forging(REAL.replace(b"pid:19014", b"pid:%d" % i)) for i in range(AUTH_LINES_MAX)]
    lines = auth_lines(_keys(*forged, REAL), AUTH)
    assert len(lines) == AUTH_LINES_MAX + 1
    with pytest.raises(IdentityUnclearError, match="starts 9 lines"):
        auth_records(AuthView(AUTH, lines, 0, ""), TARGET)


def test_a_line_longer_than_the_kernel_writes_is_not_read() -> None:
    long = REAL.replace(b"ci:0", b"ci:" + b"0" * AUTH_LINE_MAX)
    assert auth_lines(_keys(_forging(long), REAL), AUTH) == (REAL,)


def test_a_line_for_another_uid_is_not_the_requests() -> None:
    line = REAL.replace(b"    0     0 .request_", b"65534 65534 .request_")
    with pytest.raises(IdentityError, match="is for uid 65534, the request for 0"):
        auth_record(_keys(line), AUTH, TARGET, uid=0)


def test_a_forged_line_alone_is_refused_when_it_is_not_the_kernels_shape() -> None:
    # A user key's line ends in ": DATALEN": without a newline after it, it parses as nothing.
    forged = REAL.replace(b"pid:19014 ci:0", b"pid:1 ci:0: 1")
    with pytest.raises(IdentityError, match="is not one"):
        auth_record(_keys(OTHER, forged), AUTH, TARGET)


@pytest.mark.parametrize(
    "separator", [b"\r", b"\x0b", b"\x0c", b"\x1c", b"\x85", b"\xe2\x80\xa8", b" "]
)
def test_only_a_newline_starts_a_line(separator: bytes) -> None:
    """Bytes other text tools take for line breaks are parts of a description here."""
    forged = b"2a000001 I--Q---     1 perm 3f010001  1000  1000 user      x:" + separator
    forged += REAL.replace(b"pid:19014", b"pid:1") + b": 1"
    assert auth_record(_keys(forged, REAL), AUTH, TARGET).tid == 19014


def test_other_authorization_keys_do_not_count() -> None:
    other = REAL.replace(b"11794e12", b"21794e12").replace(b"pid:19014", b"pid:5")
    assert auth_record(_keys(other, REAL), AUTH, TARGET).tid == 19014


def test_a_missing_line_refuses() -> None:
    with pytest.raises(IdentityError, match="not in /proc/keys"):
        auth_record(_keys(OTHER, USER_KEY), AUTH, TARGET)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (REAL.replace(b"key:3595579c", b"key:3595579d"), "is not for key"),
        (REAL.replace(b"pid:19014", b"pid:0"), "names no task"),
        (REAL.replace(b"pid:19014", b"pid:-5"), "is not one"),
        (REAL.replace(b"pid:19014", b"pid:19O14"), "is not one"),
        (REAL.replace(b"I------", b"IR-----"), "is not live"),
        (REAL.replace(b"I------", b"I----N-"), "is not live"),
        (REAL.replace(b"I------", b"-------"), "is not live"),
        (REAL.replace(b".request_", b"user     "), "is not one"),
        (REAL + b" pid:7", "is not one"),
        (REAL.replace(b"ci:0", b"ci:0 "), "is not one"),
        (REAL.replace(b"key:3595579c", b"key:3595579C"), "is not one"),
    ],
)
def test_a_line_that_is_not_the_kernels_refuses(line: bytes, why: str) -> None:
    with pytest.raises(IdentityError, match=why):
        auth_record(_keys(OTHER, line), AUTH, TARGET)


def test_a_small_serial_is_matched_with_its_leading_zeros() -> None:
    line = b"00001234 I------     4 perm 1b010000     0     0 .request_ key:3595579c pid:77 ci:0"
    forged = _forging(b"1234 I------     4 perm 1b010000     0     0 .request_ key:1 pid:1 ci:0")
    assert auth_record(_keys(forged, line), 0x1234, TARGET).tid == 77


def test_binary_descriptions_elsewhere_are_harmless() -> None:
    odd = b"2a000002 I--Q---     1 perm 3f010001  1000  1000 user      \xff\xfe\x00?: 3"
    assert auth_record(_keys(odd, REAL), AUTH, TARGET).tid == 19014


# --- /proc/PID/cgroup ------------------------------------------------------------------------

HYBRID = b"9:name=systemd:/\n8:pids:/\n4:memory:/process_api/5a543f\n1:cpu:/\n"


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"0::/system.slice/nginx.service\n", "/system.slice/nginx.service"),
        (HYBRID + b"0::/kmstest.slice/app.service\n", "/kmstest.slice/app.service"),
        (b"0::/\n", "/"),
        (b"0::/a.slice/x\ty.service\n", "/a.slice/x\ty.service"),
        (b"0::/a.slice/b (deleted)\n", "/a.slice/b (deleted)"),
        (b"0::/a.slice/caf\xc3\xa9:1.scope\n", "/a.slice/caf\u00e9:1.scope"),
        (b"0::/a.slice/\xff.scope\n", "/a.slice/\udcff.scope"),
    ],
)
def test_the_cgroup2_line_gives_the_path(raw: bytes, path: str) -> None:
    assert cgroup_path(raw) == path


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"0::/a.slice/x\n0::/system.slice/nginx.service\n", "2 cgroup2 lines"),
        (HYBRID, "0 cgroup2 lines"),
        (b"", "0 cgroup2 lines"),
        (b"0::/a.slice/x\nnginx.service\n", "a line the kernel does not write"),
        (b"0::/a.slice\n5:cpu:relative\n", "a line the kernel does not write"),
        (b"0::relative/path\n", "a line the kernel does not write"),
        (b"0::/../../outside.service\n", "not below this namespace"),
        (b"0::/a.slice//b.service\n", "not below this namespace"),
        (b"0::/a.slice/./b.service\n", "not below this namespace"),
        (b"0::/a.slice/\n", "not below this namespace"),
    ],
)
def test_a_cgroup_file_the_kernel_would_not_write_refuses(raw: bytes, why: str) -> None:
    with pytest.raises(IdentityError, match=why):
        cgroup_path(raw)


@pytest.mark.parametrize(
    ("parts", "unit"),
    [
        (["system.slice", "nginx.service"], "nginx.service"),
        (["user.slice", "user-1000.slice", "session-2.scope"], "session-2.scope"),
        (["system.slice", "app.service", "worker"], "app.service"),
        (["system.slice", "docker.socket"], "docker.socket"),
        (["system.slice", "x.service", "y.scope"], "y.scope"),
        (["system.slice"], None),
        (["kmstest.slice", ".service"], None),
        ([], None),
        (["init.scope"], "init.scope"),
    ],
)
def test_the_unit_is_the_last_component_with_a_unit_suffix(
    parts: list[str], unit: str | None
) -> None:
    assert unit_of(parts) == unit


def _tree(root: Path, *parts: str) -> Path:
    """A directory tree with cgroup.procs and cgroup.threads in each directory, root-owned."""
    path = root
    for part in parts:
        path = path / part
        path.mkdir(mode=0o755)
        for name in ("cgroup.procs", "cgroup.threads"):
            (path / name).write_text("")
            (path / name).chmod(0o644)
    return path


def test_a_tree_only_root_can_write_is_trusted_to_its_end(tmp_path: Path) -> None:
    _tree(tmp_path, "system.slice", "nginx.service")
    assert trusted_depth(str(tmp_path), ["system.slice", "nginx.service"]) == 2
    assert trusted_depth(str(tmp_path), []) == 0


@pytest.mark.parametrize("what", ["directory", "cgroup.procs", "cgroup.threads", "group-write"])
def test_a_delegated_cgroup_ends_the_trusted_part(tmp_path: Path, what: str) -> None:
    leaf = _tree(tmp_path, "user.slice", "user@1000.service", "app.slice", "nginx.service")
    delegated = leaf.parent.parent
    if what == "directory":
        os.chown(delegated, 1000, -1)
    elif what == "group-write":
        delegated.chmod(0o775)
    else:
        os.chown(delegated / what, 1000, -1)
    parts = ["user.slice", "user@1000.service", "app.slice", "nginx.service"]
    depth = trusted_depth(str(tmp_path), parts)
    assert depth == 2
    assert unit_of(parts[:depth]) == "user@1000.service"


def test_a_cgroup_missing_under_the_mount_refuses(tmp_path: Path) -> None:
    _tree(tmp_path, "system.slice")
    with pytest.raises(IdentityError, match="is not under"):
        trusted_depth(str(tmp_path), ["system.slice", "gone.service"])


def test_the_cgroup2_mount_is_found_in_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "25 1 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755\n"
        "30 25 0:27 /sub /mnt/bind rw - cgroup2 cgroup2 rw\n"
        "35 25 0:27 / /sys/fs/cgroup/my\\040unified rw shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert cgroup2_mount((), str(info)) == "/sys/fs/cgroup/my unified"
    legacy = tmp_path / "mountinfo-legacy"
    legacy.write_text("25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs ro\n")
    with pytest.raises(IdentityError, match="no cgroup2 hierarchy"):
        cgroup2_mount((), str(legacy))
    # The usual places come first; on this machine one of them is the real hierarchy.
    assert cgroup2_mount() in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


# --- a fake /proc ------------------------------------------------------------------------------


def _status(pid: int, tgid: int, *, fsuid: int = 1000, sigpnd: str = "0", state: str = "D") -> str:
    return (
        "Name:\tpython\\n0::/fake\n"  # the kernel escapes a newline in the name, as here
        f"State:\t{state} (disk sleep)\nTgid:\t{tgid}\nPid:\t{pid}\nPPid:\t400\n"
        f"Uid:\t{fsuid}\t{fsuid}\t{fsuid}\t{fsuid}\nSigPnd:\t{int(sigpnd, 16):016x}\n"
        "ShdPnd:\t0000000000000000\n"
    )


def _fake_proc(tmp: Path, exe: str, cgroup: str = "0::/system.slice/app.service\n") -> Path:
    """/proc with thread 501 of process 500 waiting in request_key, its parents 400 and 1."""
    proc = tmp / "proc"
    task = proc / "500" / "task" / "501"
    task.mkdir(parents=True)
    (proc / "501").mkdir()
    (proc / "501" / "status").write_text(_status(501, 500))
    (task / "status").write_text(_status(501, 500))
    (task / "cgroup").write_text(cgroup)
    (task / "exe").symlink_to(exe)
    for pid, ppid in ((400, 1), (1, 0)):
        (proc / str(pid)).mkdir()
        (proc / str(pid) / "stat").write_text(f"{pid} (a) b) 1 2 (c) S {ppid} 1 1\n")
    line = REAL.replace(b"pid:19014", b"pid:501").replace(b"    0     0 .", b" 1000  1000 .")
    (proc / "keys").write_bytes(_keys(OTHER, line))
    return proc


@pytest.fixture
def cgroup_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    _tree(root, "system.slice", "app.service")
    return root


def test_a_task_is_seen_through_proc(tmp_path: Path, cgroup_root: Path) -> None:
    env = shutil.which("env")
    assert env is not None
    exe = os.path.realpath(env)
    proc = _fake_proc(tmp_path, exe)
    who = identify(TARGET, auth=AUTH, uid=1000, proc=str(proc), cgroup_root=str(cgroup_root))
    assert who == Requester(
        tid=501,
        tgid=500,
        uid=1000,
        parents=(400, 1),
        cgroup="/system.slice/app.service",
        trusted="/system.slice/app.service",
        unit="app.service",
        exe=exe,
        exe_problem=None,
    )
    assert who.summary() == (
        f"pid=501 tgid=500 ppids=400,1 unit=app.service cgroup=/system.slice/app.service exe={exe}"
    )


def test_a_request_for_another_uid_refuses(tmp_path: Path, cgroup_root: Path) -> None:
    proc = _fake_proc(tmp_path, "/bin/sh")
    with pytest.raises(IdentityError, match="is for uid 1000, the request for 0"):
        identify(TARGET, auth=AUTH, uid=0, proc=str(proc), cgroup_root=str(cgroup_root))


@pytest.mark.parametrize(
    ("status", "error", "why"),
    [
        (_status(501, 500, sigpnd="100"), RequesterGoneError, "exiting"),
        (_status(501, 500, state="Z"), RequesterGoneError, "exiting"),
        (_status(502, 500), IdentityError, "names task 502"),
        (_status(501, 500, fsuid=0), IdentityError, "has fsuid 0"),
        ("Name:\tx\nPid:\t501\n", IdentityError, "unreadable status"),
        (_status(501, 500).replace("SigPnd:\t0", "SigPnd:\tz"), IdentityError, "unreadable"),
    ],
)
def test_a_task_that_is_not_the_waiting_requester_refuses(
    tmp_path: Path, cgroup_root: Path, status: str, error: type[Exception], why: str
) -> None:
    proc = _fake_proc(tmp_path, "/bin/sh")
    (proc / "501" / "status").write_text(status)
    with pytest.raises(error, match=why):
        inspect_task(501, 1000, proc=str(proc), cgroup_root=str(cgroup_root))


def test_a_requester_gone_refuses_as_gone(tmp_path: Path, cgroup_root: Path) -> None:
    proc = _fake_proc(tmp_path, "/bin/sh")
    (proc / "500" / "task" / "501" / "cgroup").unlink()
    with pytest.raises(RequesterGoneError, match="exited"):
        inspect_task(501, 1000, proc=str(proc), cgroup_root=str(cgroup_root))
    shutil.rmtree(proc / "501")
    with pytest.raises(RequesterGoneError, match="has exited"):
        inspect_task(501, 1000, proc=str(proc), cgroup_root=str(cgroup_root))


def test_an_executable_a_user_could_change_is_not_trusted(
    tmp_path: Path, cgroup_root: Path
) -> None:
    mine = tmp_path / "home" / "bin" / "app"
    mine.parent.mkdir(parents=True)
    mine.write_text("#!/bin/sh\n")
    os.chown(mine.parent, 1000, 1000)
    proc = _fake_proc(tmp_path, str(mine))
    who = inspect_task(501, 1000, proc=str(proc), cgroup_root=str(cgroup_root))
    assert who.exe == str(mine)
    assert who.exe_problem == f"{mine.parent} is writable by a non-root user"


def test_a_sticky_root_directory_does_not_spoil_a_root_owned_path(
    tmp_path: Path, cgroup_root: Path
) -> None:
    shared = tmp_path / "shared"
    (shared / "opt").mkdir(parents=True)
    shared.chmod(0o1777)
    program = shared / "opt" / "app"
    program.write_text("#!/bin/sh\n")
    proc = _fake_proc(tmp_path, str(program))
    who = inspect_task(501, 1000, proc=str(proc), cgroup_root=str(cgroup_root))
    assert who.exe_problem is None
    shared.chmod(0o777)  # not sticky: anyone may rename opt/ away and put another there
    who = inspect_task(501, 1000, proc=str(proc), cgroup_root=str(cgroup_root))
    assert who.exe_problem == f"{shared} is writable by a non-root user"


def test_hostile_names_are_quoted_in_the_summary() -> None:
    who = Requester(
        tid=7,
        tgid=7,
        uid=1000,
        parents=(),
        cgroup='/a.slice/x"\tunit=nginx.service.scope',
        trusted="/a.slice",
        unit=None,
        exe="/tmp/x\nexe=/usr/sbin/nginx",
        exe_problem="not at that path",
    )
    line = who.summary()
    assert "\n" not in line and "\t" not in line
    assert 'cgroup="/a.slice/x\\x22\\x09unit=nginx.service.scope"' in line
    assert 'exe="/tmp/x\\x0aexe=/usr/sbin/nginx"' in line
    assert "delegated_at=/a.slice" in line
    assert " unit=" not in line.replace("\\x09unit=", "")


def test_a_requester_killed_after_identification_is_caught_before_answering(
    tmp_path: Path, cgroup_root: Path
) -> None:
    proc = _fake_proc(tmp_path, "/bin/sh")
    who = inspect_task(501, 1000, proc=str(proc), cgroup_root=str(cgroup_root))
    check_alive(who, proc=str(proc))
    (proc / "500" / "task" / "501" / "status").write_text(_status(501, 500, sigpnd="100"))
    with pytest.raises(RequesterGoneError, match="exiting"):
        check_alive(who, proc=str(proc))
    shutil.rmtree(proc / "500")
    with pytest.raises(RequesterGoneError, match="has exited"):
        check_alive(who, proc=str(proc))


def test_a_proc_file_root_cannot_read_refuses(tmp_path: Path, cgroup_root: Path) -> None:
    proc = _fake_proc(tmp_path, "/bin/sh")
    cgroup = proc / "500" / "task" / "501" / "cgroup"
    cgroup.unlink()
    cgroup.mkdir()  # reading a directory fails with EISDIR: neither gone nor readable
    with pytest.raises(IdentityError, match="cannot read what the kernel shows"):
        identify(TARGET, auth=AUTH, proc=str(proc), cgroup_root=str(cgroup_root))
