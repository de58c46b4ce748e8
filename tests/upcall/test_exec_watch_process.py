"""`kmskeys exec --watch` as a process: signals forwarded, exit status passed on, the parent's
death, the hook, usage errors, the import path, and a non-root user (tests/upcall/watching.py)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kmskeys.cli import EXIT_COMMAND_NOT_FOUND, EXIT_USAGE
from tests.support.names import unique
from tests.support.requester import Requester
from tests.upcall.conftest import KMSKEYS, Install
from tests.upcall.watching import INTERVAL, WAIT, Watching, deployed, no_secret_in, rotate

pytestmark = pytest.mark.upcall


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


@pytest.mark.parametrize("ignored", [True, False], ids=["under nohup", "plain"])
def test_a_watch_under_nohup_says_the_signal_will_not_reach_cmd(
    resolver: Install, ignored: bool
) -> None:
    ((name, value),) = deployed(resolver, 1)
    argv = [str(KMSKEYS), "exec", "--prefix", resolver.prefix, "--watch"]
    argv += ["--on-change=signal:HUP", "--file", f"token={name}", "--", "/bin/sh", "-c"]
    argv += ["exec grep ^SigIgn: /proc/self/status"]  # what the command inherits

    def nohup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN if ignored else signal.SIG_DFL)

    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, preexec_fn=nohup
    )
    assert done.returncode == 0, done.stderr
    mask = int(done.stdout.split()[1], 16)
    assert bool(mask & 1 << (signal.SIGHUP - 1)) == ignored, done.stdout  # kept, as exec(1) does
    warned = "SIGHUP is ignored in this process (started under nohup?)" in done.stderr
    assert warned == ignored, done.stderr
    assert no_secret_in(done.stderr + done.stdout, value)


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
        # A runner started under nohup passes SIGHUP on ignored, and the shell below could not
        # trap it (test_a_watch_under_nohup_says_the_signal_will_not_reach_cmd).
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        return cli.main(
            ["exec", "--prefix", resolver.prefix, "--watch", "--on-change=signal:HUP",
             "--interval", INTERVAL, "--file", f"token={name}", "--", "/bin/sh", "-c", SH_CHILD]
        )  # fmt: skip

    result: list[object] = []
    runner = threading.Thread(target=lambda: result.append(requester.run("nobody", watch_as_user)))
    runner.start()
    lines = Lines(out_r)
    parent = shell = None
    try:
        start = lines.next()
        shell, parent = int(start[1]), int(start[2])
        assert start[:1] == ["start"] and start[3:] == [v1.hex()], start
        rotate(resolver, name, resolver.blob(v2, name))
        assert lines.next() == ["hup", start[1], start[2], v2.hex()]
        os.kill(parent, signal.SIGTERM)  # the watch's parent: forwarded to the shell
        assert lines.next()[:1] == ["term"]
        runner.join(timeout=WAIT)
    finally:
        if runner.is_alive() and parent is not None:
            os.kill(parent, signal.SIGKILL)  # the shell follows (PR_SET_PDEATHSIG)
        runner.join(timeout=WAIT)
        if shell is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(shell, signal.SIGKILL)  # a failed test must not hang on its stderr
        # Closed only now: the thread forks the user's child at a moment of its own choosing.
        os.close(out_w)
        os.close(err_w)
        lines.close()
        logged = Lines(err_r).rest()
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

    def rest(self) -> str:
        """Everything up to the end of the pipe, or what came within WAIT seconds."""
        out, end = [], time.monotonic() + WAIT
        with self.file:
            fd = self.file.fileno()
            while select.select([fd], [], [], max(0.0, end - time.monotonic()))[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out.append(chunk)
        return b"".join(out).decode(errors="replace")

    def close(self) -> None:
        self.file.close()
