"""`kmskeys-resolver handle`: the request-key program that turns a blob into a kernel key.

/sbin/request-key runs it as root for every cache miss, with the argv fixed by the rule install
writes: `handle --config PATH %k %d %u %g %T %P %S`. It assumes authority over the key, then
either instantiates it or rejects it with `negative_ttl` and the errno of the failure class, on
every path, and writes exactly one log line. It prints nothing to stdout.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from kmskeys.errors import KmsKeysError
from kmskeys.keyutils import KEY_SPEC_REQKEY_AUTH_KEY, keyctl_read
from kmskeys.lowlevel import Key
from kmskeys.lowlevel.process import disable_core_dumps
from kmskeys.rules import HANDLER_MACROS
from resolver import background, pipeline
from resolver import config as config_mod
from resolver.answer import answer, log_error, log_writer
from resolver.errors import ConfigError, DeadlineExceeded, ResolverError, failure
from resolver.outcome import Outcome
from resolver.pipeline import KernelRequest

# Time kept back from the deadline for the reject and the log line after the watchdog fires.
WATCHDOG_MARGIN = 0.25
DEFAULT_DEADLINE = 8.0
DEFAULT_NEGATIVE_TTL = 10
# The request-key macros install puts in the rule, in this order: kmskeys/rules.py, the one
# grammar of the rule line (it says why %c is not among them).
USAGE = f"usage: kmskeys-resolver handle [--config PATH] {' '.join(HANDLER_MACROS)}"


@dataclass(frozen=True)
class HandleArgs:
    """The request as /sbin/request-key passes it."""

    config: Path
    key: int
    description: str
    uid: int
    gid: int
    thread_keyring: int
    process_keyring: int
    session_keyring: int


def parse_args(argv: Sequence[str]) -> HandleArgs:
    """Parse the handler's fixed argv; raise ValueError if it does not fit."""
    # Not argparse: only the leading `--config PATH` written by install is an option.
    args = list(argv)
    config = config_mod.DEFAULT_PATH
    if len(args) >= 2 and args[0] == "--config":
        config = Path(args[1])
        args = args[2:]
    if len(args) == 8:
        # A rule written by an older install also passes %c third: never used (the callout
        # comes from the authorization key), and `kmskeys doctor` says to re-run install.
        del args[2]
    if len(args) != 7:
        raise ValueError(USAGE)
    key, desc, uid, gid, thread, process, session = args
    try:
        return HandleArgs(
            config, int(key), desc, int(uid), int(gid), int(thread), int(process), int(session)
        )
    except ValueError:
        raise ValueError(USAGE) from None


def process_started(pid: int | str = "self") -> float:
    """When process `pid` (by default this one) started, on the time.monotonic() clock (its
    start from /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # Field 22, after the parenthesised command name, is the start time in clock ticks.
            start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


class Watchdog:
    """Raises DeadlineExceeded in this (main) thread when time.monotonic() reaches a deadline.

    `fired` stays True once it has: whatever exception follows (the signal may land inside an
    import or a class creation and surface as something else) is then a missed deadline.
    """

    def __init__(self) -> None:
        self.fired = False

    @contextmanager
    def armed(self, deadline: float) -> Iterator[None]:
        """Arm for `deadline` for the duration of the block."""

        def fire(signum: int, frame: FrameType | None) -> None:
            self.fired = True
            raise DeadlineExceeded

        previous = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, deadline - time.monotonic()))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _scrub_environment() -> None:
    # The resolver's settings come from its root-owned config only; request-key already runs us
    # with an almost empty environment, and a root shell running us by hand must not differ.
    for var in list(os.environ):
        if var.startswith(("AWS_", "BOTO_")):
            del os.environ[var]


class Handler:
    """One request: resolve (resolver/pipeline.py), then answer and log once
    (resolver/answer.py), under the watchdog."""

    def __init__(
        self, args: HandleArgs, started: float, config: config_mod.Config | None = None
    ) -> None:
        self.args = args
        # Loaded (and validated) by the supervisor before it forked this worker, if it could.
        self.preloaded = config
        self.started = started
        self.key = Key(args.key)
        self.log = log_writer()
        self.negative_ttl = DEFAULT_NEGATIVE_TTL
        self.watchdog = Watchdog()
        # What was resolved under which config, for refresh-ahead's record of the key.
        self.asked: KernelRequest | None = None
        self.config: config_mod.Config | None = None

    def run(self) -> int:
        """Handle the request; the exit status is for request-key's log only."""
        args = self.args
        try:
            self.key.assume_authority()
        except KmsKeysError as exc:
            # Without authority nothing can be instantiated or rejected: the kernel negates.
            reason = f"cannot assume authority: {exc}"
            log_error(
                self.log,
                reason,
                uid=args.uid,
                name=args.description,
                key=args.key,
                started=self.started,
            )
            return 1
        asked = KernelRequest(args.key, args.description, args.uid, args.gid)
        outcomes = [self._outcome(asked)]

        def again() -> Outcome:
            # Flushed by root meanwhile: resolved anew (resolver/answer.py, flushepoch.py).
            outcomes.append(self._outcome(asked))
            return outcomes[-1]

        code = answer(self.key, outcomes[0], self.log, self.started, again)
        outcome = outcomes[-1]
        if code == 0 and outcome.answered and self.config is not None and self.asked is not None:
            # After the answer: the key exists now. Refresh-ahead renews it before it expires.
            from resolver.keyrecords import remember

            remember(self.config, self.asked, outcome, time.clock_gettime(time.CLOCK_BOOTTIME))
        return code

    def _outcome(self, asked: KernelRequest) -> Outcome:
        try:
            return self._resolve(asked)
        except (Exception, DeadlineExceeded) as exc:  # every failure is answered
            return pipeline.rejection(asked, self.failure(exc), self.negative_ttl)

    def _resolve(self, asked: KernelRequest) -> Outcome:
        watchdog, started = self.watchdog, self.started
        with watchdog.armed(started + DEFAULT_DEADLINE - WATCHDOG_MARGIN):
            # After assume_authority, reading the authorization key gives the callout.
            callout = keyctl_read(KEY_SPEC_REQKEY_AUTH_KEY)
            args = self.args
            asked = KernelRequest(
                asked.key,
                asked.description,
                asked.uid,
                asked.gid,
                callout=callout,
                # Where the requester's key may go, if its name is bound to programs: this
                # process holds the authority, so the pipeline looks at the request itself.
                keyrings=(args.thread_keyring, args.process_keyring, args.session_keyring),
            )
            config = self._load_config()
            self.asked, self.config = asked, config
            deadline = started + config.deadline - WATCHDOG_MARGIN
            with watchdog.armed(deadline):
                return pipeline.resolve(asked, config, deadline, fired=lambda: watchdog.fired)

    def failure(self, exc: BaseException) -> ResolverError:
        """The class a failure is answered with: once the watchdog has fired, always EAGAIN."""
        return failure(exc, self.watchdog.fired)

    def _load_config(self) -> config_mod.Config:
        if self.preloaded is not None:
            config = self.preloaded
        else:
            try:
                config = config_mod.load(self.args.config)
            except ConfigError:
                # A trusted file with a mistake elsewhere still says where its lines go.
                self.log = log_writer(found=config_mod.log_settings(self.args.config))
                raise
        self.log = log_writer(config)
        self.negative_ttl = config.negative_ttl
        return config


def main(
    argv: Sequence[str], started: float | None = None, config: config_mod.Config | None = None
) -> int:
    """Run the handler for request-key's argv (after `handle`); `started` is when handling began
    (the supervising parent's start), by default this process's start; `config`, the config the
    supervisor already loaded from the same --config path (None: load it here)."""
    started = process_started() if started is None else started
    _scrub_environment()
    # Plaintext passes through this process: no core file may ever hold it.
    disable_core_dumps()
    try:
        args = parse_args(argv)
    except ValueError as exc:
        log_error(log_writer(), str(exc))
        return 2
    if config is not None and config.path != args.config:
        config = None
    # This process must exit for the requester to wake: a refresh that outlives the request
    # goes on in a detached child (resolver/background.py).
    background.use_fork()
    return Handler(args, started, config).run()
