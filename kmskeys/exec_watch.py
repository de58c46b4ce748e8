"""`kmskeys exec --watch`: stay as a small parent, and bring a rotated secret to the command.

The command is this process's child. Every `--interval` seconds the parent describes the kernel
key of each secret it resolved (kmskeys/watch.py: no KMS call, no upcall, no payload read). A
key that stops answering (a flush, the host-wide one included, or its expiry) is resolved again
through get_secret; a new value is written over its `--file` credentials at once (atomically,
in the private filesystem: kmskeys/credfs.py), and the command gets it by `--on-change`:

- `restart` (the default): SIGTERM, SIGKILL after `--stop-timeout`, then the command again,
  with every secret resolved anew (the only way a new `--env` value can reach it);
- `signal:SIG`: SIG (e.g. `signal:HUP`) to the command, which re-reads its files;
- `exec:CMD`: CMD (split like a shell word list, run without a shell) with $KMSKEYS_CHILD_PID,
  $KMSKEYS_CHANGED (the credential files that changed) and $CREDENTIALS_DIRECTORY.

At most one such action per `--holdoff` seconds: changes in between are merged into one action
at its end, with the newest values, so a flapping secret cannot restart-loop the command.
A failure to resolve (KMS down, throttled) keeps the old value and the command, and is retried
with backoff; a refusal or an unknown name (the resolver's definitive answers) stops the command
and removes its files, unless `--on-revoke=keep`. Signals sent to the parent are forwarded to
the command; the command's end ends the watch, with its exit status (or its signal). The parent
is made non-dumpable (no core file, no ptrace or /proc/PID/mem for its uid) and keeps no secret
between events. docs/cli.md says all of this for users, with the limits.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from kmskeys import credfs
from kmskeys.exec_plan import (
    CannotRunError,
    Plan,
    SecretWithdrawnError,
    UsageError,
    child_env,
)
from kmskeys.watch import Outcome, SecretWatch

PROG = "kmskeys exec"
# Forwarded to the command; SIGCHLD tells of its end. All are blocked and taken with
# sigtimedwait, so the parent has no handler and no race between a signal and its loop.
FORWARDED = frozenset(
    {
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGALRM,
        signal.SIGTERM,
        signal.SIGWINCH,
    }
)
_WAITED = FORWARDED | {signal.SIGCHLD}
# Signals after which a restart under way is called off: the command is being stopped.
_ENDING = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM})
# si_code of a signal the kernel sent itself, as a terminal does (^C, ^\) to its whole
# foreground process group, the command included: forwarding it would deliver it twice.
SI_KERNEL = 0x80
# An exec:CMD hook still running after this long is killed (the next one can then run).
HOOK_TIMEOUT = 60.0
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4
_NO_SIGNAL = frozenset({signal.SIGKILL, signal.SIGSTOP})
_NEVER = float("inf")


@dataclass(frozen=True)
class OnChange:
    """What to do when a secret changed: restart, signal:SIG, or exec:CMD."""

    kind: str
    signal: int = 0
    argv: tuple[str, ...] = ()
    executable: str = ""  # argv[0], found on $PATH when the command line is read

    @classmethod
    def parse(cls, text: str) -> OnChange:
        """`restart`, `signal:HUP` (or `signal:SIGHUP`), or `exec:CMD ARGS` (no shell)."""
        kind, _, arg = text.partition(":")
        if text == "restart":
            return cls("restart")
        if kind == "signal" and arg:
            name = arg.upper() if arg.upper().startswith("SIG") else "SIG" + arg.upper()
            sig = getattr(signal.Signals, name, None)
            if sig is None or sig in _NO_SIGNAL:
                raise UsageError(f"--on-change={text}: not a signal the command can handle")
            return cls("signal", signal=int(sig))
        if kind == "exec" and arg.strip():
            try:
                return cls("exec", argv=tuple(shlex.split(arg)))
            except ValueError as exc:
                raise UsageError(f"--on-change=exec:...: {exc}") from None
        raise UsageError(f"--on-change={text}: expected restart, signal:SIG or exec:CMD")

    def __str__(self) -> str:
        if self.kind == "signal":
            return f"sent {signal.Signals(self.signal).name} to"
        return f"ran {self.argv[0]} for" if self.kind == "exec" else "restarting"


@dataclass(frozen=True)
class WatchOptions:
    """The watch's settings (docs/cli.md): seconds, and what a change or a refusal does."""

    on_change: OnChange
    interval: float
    holdoff: float
    stop_timeout: float
    on_revoke: str  # "stop" or "keep"


def run(plan: Plan, options: WatchOptions, secrets: dict[str, bytes], root: int | None) -> int:
    """Start the command with `secrets` and watch them until it ends; its exit status.

    Takes `secrets` over (the dict is emptied once they are placed). Raises CannotRunError if the
    command cannot start, SecretWithdrawnError once a refusal stopped it; a command killed by a
    signal is passed on: this process kills itself with the same signal.
    """
    return Parent(plan, options, root).run(secrets)


class Parent:
    """The loop of `exec --watch`: one child, one watch, one signal queue."""

    def __init__(self, plan: Plan, options: WatchOptions, root: int | None) -> None:
        self.plan, self.options, self.root = plan, options, root
        self.mapping = plan.mapping
        self.watch = SecretWatch(plan.mapping.names(), plan.prefix, plan.keyring)
        self.base_env = dict(os.environb)
        self.credentials_dir: str | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.status: int | None = None  # the command's own end: the watch is over
        self.next_env: dict[bytes, bytes] | None = None  # a restart under way: the next child's
        self.stop_by: float | None = None  # SIGKILL the command then, if still running
        self.hook: subprocess.Popen[bytes] | None = None
        self.hook_by: float | None = None
        self.act_after = -_NEVER  # the holdoff: no action before then
        self.next_poll = 0.0
        self.withdrawn: SecretWithdrawnError | None = None

    def run(self, secrets: dict[str, bytes]) -> int:
        now = time.monotonic()
        for name, value in secrets.items():
            self.watch.adopt(name, value, now)
        if self.root is not None:
            for file, name in self.mapping.files.items():
                credfs.write_file(self.root, file, secrets[name])
            self.credentials_dir = credfs.seal(self.root)
        env = child_env(self.base_env, self.mapping, secrets, self.credentials_dir)
        secrets.clear()
        _not_dumpable()
        _warn_if_ignored(self.options.on_change)
        signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
        self.child = self._spawn(env)
        del env
        self.next_poll = now + self.options.interval
        try:
            return self._loop()
        finally:
            self._close()

    def _loop(self) -> int:
        while True:
            self._work(time.monotonic())
            timeout = max(0.0, self._next_wake() - time.monotonic())
            info = signal.sigtimedwait(_WAITED, timeout)
            if info is not None:
                self._signal(info)
            if self.status is not None:
                return _pass_on(self.status)
            if self.withdrawn is not None and self.child is None:
                raise self.withdrawn

    def _work(self, now: float) -> None:
        if self.stop_by is not None and now >= self.stop_by and self.child is not None:
            self.child.kill()
            self.stop_by = None
        if self.hook_by is not None and now >= self.hook_by and self.hook is not None:
            self.hook.kill()
            self.hook_by = None
        if self.withdrawn is not None:
            return  # the command is being stopped: nothing more to bring it
        if now >= self.next_poll:
            self.watch.poll(now)
            self.next_poll = now + self.options.interval
        for name in self.watch.due(now):
            # Each resolution may wait for an upcall: times are read afresh after it.
            self._refreshed(name, self.watch.refresh(name, time.monotonic()))
            if self.withdrawn is not None:
                return
        if self._can_act() and time.monotonic() >= self.act_after and self.watch.pending():
            self._act()

    def _next_wake(self) -> float:
        times = [self.next_poll, self.stop_by or _NEVER, self.hook_by or _NEVER]
        times.append(self.watch.next_retry() or _NEVER)
        if self._can_act() and self.watch.pending():
            times.append(self.act_after)
        return min(times)

    def _can_act(self) -> bool:
        return self.withdrawn is None and self.next_env is None and self.hook is None

    def _refreshed(self, name: str, outcome: Outcome) -> None:
        if outcome.kind == "changed" and self.root is not None:
            assert outcome.value is not None
            for file in self.mapping.files_of(name):
                credfs.replace_file(self.root, file, outcome.value)
        elif outcome.kind == "failed":
            _log(
                f"secret {name!r} could not be resolved again: {outcome.error}; the command "
                f"keeps the value it has; retrying in {outcome.retry_in:.1f} s"
            )
        elif outcome.kind == "withdrawn":
            if self.options.on_revoke == "keep":
                _log(
                    f"secret {name!r} is refused now: {outcome.error}; the command keeps the "
                    f"value it has (--on-revoke=keep); asking again in {outcome.retry_in:.1f} s"
                )
            else:
                self._withdraw(name, outcome)

    def _withdraw(self, name: str, outcome: Outcome) -> None:
        assert outcome.error is not None and self.child is not None
        if self.root is not None:
            for file in self.mapping.files_of(name):
                credfs.remove_file(self.root, file)
        note = f"; stopped {self.plan.command[0]} (pid {self.child.pid}) (--on-revoke=stop)"
        self.withdrawn = SecretWithdrawnError(name, outcome.error, note=note)
        self.next_env = None
        self._stop()

    def _act(self) -> None:
        names = self.watch.pending()
        on_change = self.options.on_change
        if on_change.kind == "restart":
            if not self._prepare_restart():
                return
        elif on_change.kind == "signal":
            assert self.child is not None
            self.child.send_signal(on_change.signal)
        else:
            self.hook = self._run_hook(names)
            self.hook_by = time.monotonic() + HOOK_TIMEOUT
        self.watch.applied()
        self.act_after = time.monotonic() + self.options.holdoff
        assert self.child is not None
        shown = ", ".join(repr(name) for name in names)
        _log(f"secret {shown} changed: {on_change} {self.plan.command[0]} (pid {self.child.pid})")

    def _prepare_restart(self) -> bool:
        # Every --env secret is resolved again first (a kernel hit, as a rule), and the command
        # is stopped only once all are in hand: a failure leaves it running as it is.
        values: dict[str, bytes] = {}
        for name in dict.fromkeys(self.mapping.env.values()):
            outcome = self.watch.refresh(name, time.monotonic())
            if outcome.value is None:
                self._refreshed(name, outcome)
                self.act_after = self.watch.next_retry() or time.monotonic()
                return False
            if outcome.kind == "changed":
                self._refreshed(name, outcome)
            values[name] = outcome.value
        try:
            self.next_env = child_env(self.base_env, self.mapping, values, self.credentials_dir)
        except UsageError as exc:
            _log(f"{exc}; the command keeps the value it has")
            self.watch.applied()  # not again until the value changes again
            return False
        self._stop()
        return True

    def _stop(self) -> None:
        if self.child is not None:
            self.child.terminate()
            self.stop_by = time.monotonic() + self.options.stop_timeout

    def _signal(self, info: signal.struct_siginfo) -> None:
        sig = info.si_signo
        if sig == signal.SIGCHLD:
            self._reap()
            return
        if sig in _ENDING and self.next_env is not None:
            self.next_env = None  # stopping: not to be started again
            _log(f"{signal.Signals(sig).name} received: restart called off")
        if self.child is not None and info.si_code != SI_KERNEL:
            self.child.send_signal(sig)

    def _reap(self) -> None:
        if self.hook is not None and self.hook.poll() is not None:
            if self.hook.returncode:
                hook = self.options.on_change.argv[0]
                _log(f"{hook!r} (--on-change=exec) ended: {_ended(self.hook)}")
            self.hook, self.hook_by = None, None
        if self.child is None or self.child.poll() is None:
            return
        ended, self.child, self.stop_by = self.child, None, None
        if self.withdrawn is not None:
            return
        if self.next_env is None:
            self.status = ended.returncode
            return
        env, self.next_env = self.next_env, None
        self.child = self._spawn(env)

    def _spawn(self, env: dict[bytes, bytes]) -> subprocess.Popen[bytes]:
        try:
            return _start(list(self.plan.command), self.plan.executable, env, self.root)
        except OSError as exc:
            raise CannotRunError(exc.errno, f"{self.plan.command[0]}: {exc.strerror}") from None

    def _run_hook(self, names: list[str]) -> subprocess.Popen[bytes] | None:
        assert self.child is not None
        env = dict(self.base_env)
        files = [file for name in names for file in self.mapping.files_of(name)]
        env[b"KMSKEYS_CHANGED"] = " ".join(files).encode()
        env[b"KMSKEYS_CHILD_PID"] = str(self.child.pid).encode()
        if self.credentials_dir is not None:
            env[b"CREDENTIALS_DIRECTORY"] = self.credentials_dir.encode()
        on_change = self.options.on_change
        argv = list(on_change.argv)
        try:
            return _start(argv, on_change.executable, env, self.root)
        except OSError as exc:
            _log(f"--on-change=exec: {argv[0]}: {exc.strerror}")
            return None

    def _close(self) -> None:
        if self.hook is not None and self.hook.poll() is None:
            self.hook.terminate()
        if self.root is not None:
            os.close(self.root)
            self.root = None


def _start(
    argv: list[str], executable: str, env: dict[bytes, bytes], root: int | None
) -> subprocess.Popen[bytes]:
    """Start argv with env, the private filesystem's fd, the default signal mask and
    dispositions, and SIGTERM should this parent die first (PR_SET_PDEATHSIG)."""
    parent = os.getpid()
    prctl = _prctl()

    def in_child() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            raise OSError(0, "kmskeys exec ended before the command could start")

    # restore_signals: SIGPIPE and SIGXFSZ back to their defaults, which Python ignores.
    return subprocess.Popen(  # argv from the command line, no shell
        argv,
        executable=executable,
        env=env,
        pass_fds=() if root is None else (root,),
        preexec_fn=in_child,  # noqa: PLW1509 - no other thread runs: the watch has none
        restore_signals=True,
    )


def _pass_on(status: int) -> int:
    """The command's exit status as ours; a signal that killed it kills this process too."""
    if status >= 0:
        return status
    sig = -status
    sys.stdout.flush()
    sys.stderr.flush()
    if sig not in _NO_SIGNAL:  # SIGKILL and SIGSTOP have no disposition and no mask
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    return 128 + sig  # a signal whose default is to be ignored: the shells' status for it


def _ended(proc: subprocess.Popen[bytes]) -> str:
    code = proc.returncode
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def _prctl() -> Callable[..., int]:
    # prctl(2) is no keyctl call, and this is its only user: ctypes rather than the binding.
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def _not_dumpable() -> None:
    # No core file, and no ptrace, /proc/PID/mem or environ for this uid (root aside). The
    # command is dumpable again: execve(2) resets the flag for a program this user may read.
    if _prctl()(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE): {os.strerror(err)}")


def _warn_if_ignored(on_change: OnChange) -> None:
    """Say so when CMD will inherit the --on-change signal as ignored (a start under nohup):
    an ignored disposition survives execve, and a shell cannot even trap it (POSIX), so the
    change would reach the files and never the program. CMD keeps what it inherits, as under
    exec(1): a hangup of the terminal must not start killing what nohup protects."""
    if on_change.kind == "signal" and signal.getsignal(on_change.signal) == signal.SIG_IGN:
        name = signal.Signals(on_change.signal).name
        _log(
            f"warning: {name} is ignored in this process (started under nohup?) and CMD "
            f"inherits that: --on-change=signal:{name} will not reach it; use "
            f"--on-change=restart or start kmskeys exec without ignoring {name}"
        )


def _log(message: str) -> None:
    # A closed or broken stderr must not end the watch (and, through PR_SET_PDEATHSIG, CMD).
    with suppress(OSError, ValueError):
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)
