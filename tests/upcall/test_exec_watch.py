"""`kmskeys exec --watch`: a rotation (blob redeployed, root's host-wide flush) reaches the
running command, through the real upcall and a moto server behind the counting proxy.

The command is a small Python program (CHILD) that prints one JSON line per event: its start,
each signal it gets (HUP, USR1, TERM), with what it sees then (its credential file, its
environment, the directory's listing and modes, and every distinct value a reader thread saw in
the file while it was being replaced).
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kmskeys.cli import EXIT_COMMAND_NOT_FOUND, EXIT_REFUSED, EXIT_USAGE
from tests.support.kms_proxy import ProxiedRequest, kms_error
from tests.support.names import unique
from tests.support.requester import Requester
from tests.upcall.conftest import KMSKEYS, Install

pytestmark = pytest.mark.upcall

INTERVAL = "0.2"
WAIT = 30.0  # for an event that must come: a loaded 2-vCPU machine starts Pythons slowly

CHILD = r"""
import json, os, signal, stat, sys, threading, time
opts = dict(arg.split("=", 1) for arg in sys.argv[1:])
where, name, var = os.environ.get("CREDENTIALS_DIRECTORY"), opts.get("file"), opts.get("var")
seen = set()

def read():
    with open(os.path.join(where, name), "rb") as f:
        return f.read().hex()

def spin():
    while True:
        try:
            seen.add(read())
        except OSError as exc:
            seen.add("error: " + exc.strerror)
        time.sleep(0.0005)

def report(event):
    out = {"event": event, "t": time.monotonic(), "pid": os.getpid(), "ppid": os.getppid()}
    out["seen"] = sorted(seen)
    if var:
        out["env"] = os.environ.get(var)
    if where:
        st = os.stat(where)
        out["dir_mode"], out["files"] = stat.S_IMODE(st.st_mode), sorted(os.listdir(where))
    if where and name:
        try:
            out["value"] = read()
            out["file_mode"] = stat.S_IMODE(os.stat(os.path.join(where, name)).st_mode)
        except OSError as exc:
            out["value"] = "error: " + exc.strerror
    print(json.dumps(out), flush=True)

def term(*_):
    report("term")
    os._exit(int(opts.get("exit", "0")))

def usr2(*_):
    if opts.get("usr2") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(int(opts.get("usr2", "0")))

signal.signal(signal.SIGHUP, lambda *_: report("hup"))
signal.signal(signal.SIGUSR1, lambda *_: report("usr1"))
signal.signal(signal.SIGTERM, term)
signal.signal(signal.SIGUSR2, usr2)
if "spin" in opts:
    threading.Thread(target=spin, daemon=True).start()
report("start")
while True:
    signal.pause()
"""


class Watching:
    """`kmskeys exec --prefix P --watch ARGS -- python CHILD CHILD_ARGS`, its events and stderr."""

    def __init__(self, install: Install, args: list[str], child: list[str]) -> None:
        argv = [str(KMSKEYS), "exec", "--prefix", install.prefix, "--watch", *args]
        argv += ["--", sys.executable, "-c", CHILD, *child]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.errors: list[str] = []
        threading.Thread(target=self._read_events, daemon=True).start()
        threading.Thread(target=self._read_errors, daemon=True).start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:  # a hook's plain line: its first word names the event
                words = line.decode().split()
                self.events.put({"event": words[0] if words else "", "words": words})

    def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        self.errors.extend(line.decode() for line in self.proc.stderr)

    def next(self, kind: str, timeout: float = WAIT) -> dict[str, Any]:
        """The next event of this kind (earlier events of other kinds are kept in `seen`)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(event)
            if event["event"] == kind:
                return event
        raise AssertionError(f"no {kind!r} event in {timeout} s; seen {self.seen}; {self.errors}")

    def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Every event within `seconds` (expected: none)."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.events.get(timeout=left))
            except queue.Empty:
                break
        return got

    def wait(self, timeout: float = WAIT) -> int:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.1)  # the stderr reader's last line
        return code

    def __enter__(self) -> Watching:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # forwarded to the command, which exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the command gets SIGTERM (PR_SET_PDEATHSIG)
                self.proc.wait(timeout=10)


def deployed(install: Install, count: int) -> list[tuple[str, bytes]]:
    """`count` names with blobs in the install's blob_dir, and their secrets."""
    pairs = [(unique(), unique("v1").encode()) for _ in range(count)]
    for name, secret in pairs:
        install.deploy(name, install.blob(secret, name))
    return pairs


def rotate(install: Install, name: str, blob: str, *, shared: bool = False) -> None:
    """Deploy `blob` as NAME's and flush NAME host-wide, as root does after a rotation: in a
    session keyring of its own (as a root shell or an SSM command has), or this test's."""
    install.deploy(name, blob)
    session = [] if shared else ["keyctl", "session", "-"]
    argv = [*session, str(KMSKEYS), "flush", name, "--prefix", install.prefix]
    for _ in range(2):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        # Known race of `kmskeys flush` (not of the watch): after its host-wide pass, root's
        # flush invalidates every NAME key root can see, and one the watch (root here) is having
        # made fails that call with the answer's errno (EKEYREJECTED, EAGAIN), failing the flush
        # after the host-wide pass has done its work. Once more, then it must succeed.
        if "keyctl_invalidate:" not in done.stderr:
            break
    assert done.returncode == 0, done.stderr


def no_secret_in(text: str, *secrets: bytes) -> bool:
    return not any(s.decode() in text or s.hex() in text for s in secrets)


def proc_text(pid: int, what: str) -> str:
    raw = Path(f"/proc/{pid}/{what}").read_bytes()
    return raw.decode(errors="replace") + raw.hex()


def test_signal_hup_brings_the_rotated_file_to_the_same_process(resolver: Install) -> None:
    ((name, v1),) = deployed(resolver, 1)
    v2 = unique("v2").encode()
    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--file", f"token={name}"]
    with Watching(resolver, args, ["file=token", "spin=1"]) as run:
        start = run.next("start")
        assert (start["value"], start["dir_mode"], start["file_mode"]) == (v1.hex(), 0o500, 0o400)
        assert resolver.decrypts() == 1
        rotate(resolver, name, resolver.blob(v2, name))
        hup = run.next("hup")
        assert hup["pid"] == start["pid"]  # signalled, not restarted
        assert hup["value"] == v2.hex()
        # Replaced atomically: a reader looping on the file saw the old value or the new one,
        # never a missing, empty or partial file; the directory is sealed again.
        assert set(hup["seen"]) <= {v1.hex(), v2.hex()}, hup["seen"]
        assert (hup["files"], hup["dir_mode"], hup["file_mode"]) == (["token"], 0o500, 0o400)
        assert resolver.decrypts() == 2
        assert run.quiet(1.0) == []  # one change, one signal
    assert any(f"secret {name!r} changed: sent SIGHUP to" in line for line in run.errors)
    assert no_secret_in("".join(run.errors), v1, v2)


def test_rotations_that_race_the_flush_never_stop_the_command(resolver: Install) -> None:
    # Root's flush shares this test's session keyring with the watch here, so after its
    # host-wide pass it may invalidate the very key the watch just had made: request_key then
    # fails with ENOKEY although the resolver answered. The watch asks again before it calls
    # anything a refusal, and every rotation reaches the command.
    ((name, _),) = deployed(resolver, 1)
    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--holdoff", "1"]
    with Watching(resolver, [*args, "--file", f"token={name}"], ["file=token"]) as run:
        start = run.next("start")
        for _ in range(5):
            value = unique("vN").encode()
            rotate(resolver, name, resolver.blob(value, name), shared=True)
            hup = run.next("hup")
            assert (hup["pid"], hup["value"]) == (start["pid"], value.hex())
    assert not any("refused" in line or "stopped" in line for line in run.errors), run.errors


def test_restart_brings_a_rotated_env_value_and_no_secret_reaches_the_parent(
    resolver: Install,
) -> None:
    (env_name, v1), (file_name, f1) = deployed(resolver, 2)
    v2 = unique("v2").encode()
    args = ["--interval", INTERVAL, "--holdoff", "1", "--env", f"TOKEN={env_name}"]
    args += ["--file", f"db={file_name}"]
    with Watching(resolver, args, ["var=TOKEN", "file=db", "exit=0"]) as run:
        first = run.next("start")
        assert (first["env"], first["value"]) == (v1.decode(), f1.hex())
        parent = run.proc.pid
        assert first["ppid"] == parent
        rotate(resolver, env_name, resolver.blob(v2, env_name))
        assert run.next("term")["pid"] == first["pid"]  # the old command was stopped
        second = run.next("start")
        assert second["pid"] != first["pid"] and second["ppid"] == parent
        assert (second["env"], second["value"]) == (v2.decode(), f1.hex())
        # The parent's argv and environment hold no secret, old or new, nor does the command's
        # argv; the command's own environment has its --env value, as asked.
        for what in ("cmdline", "environ"):
            assert no_secret_in(proc_text(parent, what), v1, v2, f1), what
        assert no_secret_in(proc_text(second["pid"], "cmdline"), v1, v2, f1)
    assert any("changed: restarting" in line for line in run.errors), run.errors


def test_an_idle_watch_asks_nothing_and_untouched_secrets_cost_no_call(
    resolver: Install,
) -> None:
    (one, _), (two, _) = deployed(resolver, 2)
    v2 = unique("v2").encode()
    args = ["--on-change=signal:HUP", "--interval", INTERVAL]
    args += ["--file", f"one={one}", "--file", f"two={two}"]
    with Watching(resolver, args, ["file=two"]) as run:
        run.next("start")
        assert resolver.proxy is not None
        resolver.proxy.reset_counts()
        resolver.log.drain()
        time.sleep(10 * float(INTERVAL))  # ten polls
        assert resolver.decrypts() == 0
        assert resolver.log.drain() == []  # not even an upcall
        rotate(resolver, two, resolver.blob(v2, two))
        assert run.next("hup")["value"] == v2.hex()  # the watch was watching all along
        time.sleep(5 * float(INTERVAL))
        # The rotated secret cost one Decrypt; the untouched one, none: not even an upcall.
        # (Root's flush may also catch the key the watch made a moment after the rotation, as
        # root's flush reaches every key root can see: one more upcall, from the host cache.)
        assert resolver.decrypts() == 1
        lines = resolver.log.drain()
        assert lines and all(f" name={two} " in line for line in lines), lines


def test_a_flapping_secret_gets_one_action_per_holdoff(resolver: Install) -> None:
    ((name, _),) = deployed(resolver, 1)
    values = [unique(f"v{i}").encode() for i in (2, 3, 4)]
    blobs = [resolver.blob(value, name) for value in values]
    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--holdoff", "3"]
    with Watching(resolver, [*args, "--file", f"token={name}"], ["file=token"]) as run:
        run.next("start")
        rotate(resolver, name, blobs[0])
        first = run.next("hup")
        assert first["value"] == values[0].hex()
        rotate(resolver, name, blobs[1])
        time.sleep(0.6)
        rotate(resolver, name, blobs[2])
        second = run.next("hup")
        # The two later changes were merged into one signal, at the end of the holdoff, with
        # the newest value; the command never had the one in between.
        assert second["value"] == values[2].hex()
        assert second["t"] - first["t"] >= 3 - 0.1  # the command's own clock
        assert run.quiet(1.5) == []
    assert sum("changed: sent SIGHUP" in line for line in run.errors) == 2, run.errors


def test_a_failed_re_resolution_keeps_the_old_value_and_the_command(resolver: Install) -> None:
    ((name, v1),) = deployed(resolver, 1)
    v2 = unique("v2").encode()
    assert resolver.proxy is not None

    def throttled(request: ProxiedRequest) -> Any:
        return kms_error("ThrottlingException") if request.operation == "Decrypt" else None

    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--file", f"token={name}"]
    with Watching(resolver, args, ["file=token"]) as run:
        start = run.next("start")
        resolver.proxy.set_fault(throttled)
        rotate(resolver, name, resolver.blob(v2, name))
        deadline = time.monotonic() + WAIT
        while not any("could not be resolved again" in line for line in run.errors):
            assert time.monotonic() < deadline, run.errors
            time.sleep(0.1)
        os.kill(run.proc.pid, signal.SIGUSR1)  # forwarded: the command reports its file
        kept = run.next("usr1")
        assert (kept["pid"], kept["value"]) == (start["pid"], v1.hex())
        assert not [e for e in run.seen if e["event"] == "hup"]
        resolver.proxy.set_fault(None)  # KMS is back: the next retry gets the new value
        hup = run.next("hup")
        assert (hup["pid"], hup["value"]) == (start["pid"], v2.hex())
    failed = [line for line in run.errors if "could not be resolved again" in line]
    assert all("the command keeps the value it has; retrying in" in line for line in failed)
    assert no_secret_in("".join(run.errors), v1, v2)


def test_a_refused_secret_stops_the_command_and_removes_its_file(resolver: Install) -> None:
    ((name, v1),) = deployed(resolver, 1)
    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--file", f"token={name}"]
    with Watching(resolver, args, ["file=token", "exit=0"]) as run:
        start = run.next("start")
        # A blob made for another name: KMS refuses it under this one (the context binds the
        # name), so the resolver answers EKEYREJECTED, as for a revoked permission.
        rotate(resolver, name, resolver.blob(b"kmst-elsewhere", unique("other")))
        term = run.next("term")
        assert term["pid"] == start["pid"]
        assert term["files"] == []  # removed before the command was stopped
        assert run.wait() == EXIT_REFUSED
    last = run.errors[-1]
    assert f"secret {name!r}:" in last and "stopped" in last and "--on-revoke=stop" in last
    assert no_secret_in("".join(run.errors), v1)


def test_on_revoke_keep_leaves_the_command_running_on_its_value(resolver: Install) -> None:
    ((name, v1),) = deployed(resolver, 1)
    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--on-revoke=keep"]
    with Watching(resolver, [*args, "--file", f"token={name}"], ["file=token"]) as run:
        start = run.next("start")
        rotate(resolver, name, resolver.blob(b"kmst-elsewhere", unique("other")))
        deadline = time.monotonic() + WAIT
        while not any("--on-revoke=keep" in line for line in run.errors):
            assert time.monotonic() < deadline, run.errors
            time.sleep(0.1)
        os.kill(run.proc.pid, signal.SIGUSR1)
        kept = run.next("usr1")
        assert (kept["pid"], kept["value"]) == (start["pid"], v1.hex())
        assert run.proc.poll() is None


def test_signals_are_forwarded_and_the_exit_status_passed_on(resolver: Install) -> None:
    ((name, _),) = deployed(resolver, 1)
    args = ["--interval", INTERVAL, "--file", f"token={name}"]
    with Watching(resolver, args, ["file=token", "exit=7"]) as run:
        start = run.next("start")
        os.kill(run.proc.pid, signal.SIGUSR1)
        assert run.next("usr1")["pid"] == start["pid"]
        os.kill(run.proc.pid, signal.SIGTERM)
        assert run.next("term")["pid"] == start["pid"]
        assert run.wait() == 7
    # The command's own end ends the watch with its status, or with its signal.
    with Watching(resolver, args, ["file=token", "usr2=5"]) as run:
        os.kill(run.next("start")["pid"], signal.SIGUSR2)
        assert run.wait() == 5
    with Watching(resolver, args, ["file=token", "usr2=kill"]) as run:
        os.kill(run.next("start")["pid"], signal.SIGUSR2)
        assert run.wait() == -signal.SIGKILL
    assert resolver.decrypts() == 1  # one host, one secret: the later runs hit the kernel


def test_a_parent_killed_outright_takes_the_command_with_it(resolver: Install) -> None:
    ((name, _),) = deployed(resolver, 1)
    args = ["--interval", INTERVAL, "--file", f"token={name}"]
    with Watching(resolver, args, ["file=token", "exit=0"]) as run:
        start = run.next("start")
        run.proc.kill()
        # PR_SET_PDEATHSIG: the kernel sends the command SIGTERM when its parent dies, so it
        # never runs on unwatched; its private filesystem goes with its last descriptor.
        assert run.next("term")["pid"] == start["pid"]
        deadline = time.monotonic() + WAIT
        while Path(f"/proc/{start['pid']}").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_exec_hook_gets_names_and_the_directory_never_a_secret(resolver: Install) -> None:
    ((name, v1),) = deployed(resolver, 1)
    v2 = unique("v2").encode()
    hook = (
        """exec:/bin/sh -c 'echo hook "$KMSKEYS_CHANGED" "$KMSKEYS_CHILD_PID" """
        """$(od -An -tx1 "$CREDENTIALS_DIRECTORY/token" | tr -d " \\n")'"""
    )
    args = [f"--on-change={hook}", "--interval", INTERVAL, "--file", f"token={name}"]
    with Watching(resolver, args, ["file=token"]) as run:
        start = run.next("start")
        rotate(resolver, name, resolver.blob(v2, name))
        got = run.next("hook")["words"]
        assert got == ["hook", "token", str(start["pid"]), v2.hex()]
    assert no_secret_in("".join(run.errors), v1, v2)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--on-change=restart", "--env", "A={name}"], EXIT_USAGE),  # no --watch
        (["--watch", "--on-change=signal:KILL", "--file", "a={name}"], EXIT_USAGE),
        (["--watch", "--on-change=signal:NOPE", "--file", "a={name}"], EXIT_USAGE),
        (["--watch", "--on-change=exec:", "--file", "a={name}"], EXIT_USAGE),
        (["--watch", "--on-change=later", "--file", "a={name}"], EXIT_USAGE),
        (["--watch", "--on-change=signal:HUP", "--env", "A={name}"], EXIT_USAGE),
        (["--watch", "--interval", "0", "--file", "a={name}"], EXIT_USAGE),
        (["--watch", "--holdoff", "nan", "--file", "a={name}"], EXIT_USAGE),
        (
            ["--watch", "--on-change=exec:kmst-no-hook", "--file", "a={name}"],
            EXIT_COMMAND_NOT_FOUND,
        ),
    ],
)
def test_watch_usage_errors_resolve_nothing(resolver: Install, args: list[str], code: int) -> None:
    ((name, _),) = deployed(resolver, 1)
    argv = [str(KMSKEYS), "exec", "--prefix", resolver.prefix]
    argv += [arg.format(name=name) for arg in args] + ["--", "true"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == code, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert resolver.decrypts() == 0


def test_the_watch_is_off_the_client_import_path() -> None:
    code = (
        "import sys, kmskeys, kmskeys.cli, kmskeys.exec_cli\n"
        "print(sorted(m for m in sys.modules if m in ('kmskeys.watch', 'kmskeys.exec_watch')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "[]", done.stderr


SH_CHILD = r"""
report() {
    printf '%s %s %s ' "$1" "$$" "$PPID"
    od -An -tx1 "$CREDENTIALS_DIRECTORY/token" | tr -d ' \n'
    echo
}
trap 'report hup' HUP
trap 'report term; exit 7' TERM
report start
while :; do sleep 0.1; done
"""


def test_a_non_root_user_gets_the_rotation(resolver: Install, requester: Requester) -> None:
    ((name, v1),) = deployed(resolver, 1)
    v2 = unique("v2").encode()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()

    def watch_as_user() -> int:
        # In the child, as the user: kmskeys exec --watch in this process (the venv's
        # interpreter may lie below a directory the user cannot enter), the command /bin/sh.
        import ctypes

        from kmskeys import cli

        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        # As in test_exec.py: a process that changed its uids without an execve is not
        # dumpable, and its user namespace helper then cannot write its own uid_map.
        ctypes.CDLL(None, use_errno=True).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
        return cli.main(
            ["exec", "--prefix", resolver.prefix, "--watch", "--on-change=signal:HUP",
             "--interval", INTERVAL, "--file", f"token={name}", "--", "/bin/sh", "-c", SH_CHILD]
        )  # fmt: skip

    result: list[object] = []
    runner = threading.Thread(target=lambda: result.append(requester.run("nobody", watch_as_user)))
    runner.start()
    lines = Lines(out_r)
    parent = None
    try:
        start = lines.next()
        assert start[:1] == ["start"] and start[3:] == [v1.hex()], start
        parent = int(start[2])
        rotate(resolver, name, resolver.blob(v2, name))
        assert lines.next() == ["hup", start[1], start[2], v2.hex()]
        os.kill(parent, signal.SIGTERM)  # the watch's parent: forwarded to the shell
        assert lines.next()[:1] == ["term"]
        runner.join(timeout=WAIT)
    finally:
        if runner.is_alive() and parent is not None:
            os.kill(parent, signal.SIGKILL)  # the shell follows (PR_SET_PDEATHSIG)
        runner.join(timeout=WAIT)
        # Closed only now: the thread forks the user's child at a moment of its own choosing.
        os.close(out_w)
        os.close(err_w)
        lines.close()
        with os.fdopen(err_r, "r") as errors:
            logged = errors.read()
    assert result == [{"ok": 7}], (result, logged)
    assert f"secret {name!r} changed: sent SIGHUP" in logged
    assert no_secret_in(logged, v1, v2)


class Lines:
    """Lines of a pipe, each split into words, waited for at most WAIT seconds."""

    def __init__(self, fd: int) -> None:
        self.file = os.fdopen(fd, "r")

    def next(self) -> list[str]:
        ready, _, _ = select.select([self.file], [], [], WAIT)
        assert ready, f"no line in {WAIT} s"
        return self.file.readline().split()

    def close(self) -> None:
        self.file.close()
