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

from kmskeys.contract import ADMIN_GROUP, ADMIN_KEY_PERM, RESOLVED_KEY_PERM, USER_PAYLOAD_MAX
from kmskeys.errors import InvalidNameError, KmsKeysError, QuotaExceededError
from kmskeys.key import Key
from kmskeys.keyutils import KEY_SPEC_REQKEY_AUTH_KEY, disable_core_dumps, keyctl_read
from resolver import config as config_mod
from resolver.backend import Request, Trace
from resolver.errors import (
    ConfigError,
    DeadlineExceeded,
    QuotaError,
    RefusedError,
    ResolverError,
    UnavailableError,
    errno_name,
)
from resolver.log import LOG_ERR, LOG_INFO, LOG_WARNING, SyslogWriter, format_fields
from resolver.policy import check_allowed, user_name
from resolver.registry import backend_for, split_description

# Time kept back from the deadline for the reject and the log line after the watchdog fires.
WATCHDOG_MARGIN = 0.25
DEFAULT_DEADLINE = 8.0
DEFAULT_NEGATIVE_TTL = 10
USAGE = "usage: kmskeys-resolver handle [--config PATH] %k %d %u %g %T %P %S"
# The request-key macros install puts in the rule, in this order. The callout (%c) is not among
# them: it would show in this process's argv (/proc/PID/cmdline) to every local user; the
# handler reads it from the request's authorization key instead.
MACROS = "%k %d %u %g %T %P %S"


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


def process_started() -> float:
    """When this process started, on the time.monotonic() clock (its start from /proc)."""
    try:
        with open("/proc/self/stat", "rb") as f:
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
    """One request: resolve, then instantiate or reject, then log once."""

    def __init__(
        self, args: HandleArgs, started: float, config: config_mod.Config | None = None
    ) -> None:
        self.args = args
        # Loaded (and validated) by the supervisor before it forked this worker, if it could.
        self.preloaded = config
        self.started = started
        self.key = Key(args.key)
        self.log = SyslogWriter(config_mod.DEFAULT_SYSLOG_SOCKET, config_mod.FACILITIES["authpriv"])
        self.negative_ttl = DEFAULT_NEGATIVE_TTL
        self.name: str | None = None
        self.user: str | None = None
        self.trace = Trace()
        self.watchdog = Watchdog()
        self.callout = b""

    def run(self) -> int:
        """Handle the request; the exit status is for request-key's log only."""
        try:
            self.key.assume_authority()
        except KmsKeysError as exc:
            # Without authority nothing can be instantiated or rejected: the kernel negates.
            self._emit(LOG_ERR, "error", reason=f"cannot assume authority: {exc}")
            return 1
        watchdog = self.watchdog
        try:
            with watchdog.armed(self.started + DEFAULT_DEADLINE - WATCHDOG_MARGIN):
                # After assume_authority, reading the authorization key gives the callout.
                self.callout = keyctl_read(KEY_SPEC_REQKEY_AUTH_KEY)
                config = self._load_config()
                with watchdog.armed(self.started + config.deadline - WATCHDOG_MARGIN):
                    plaintext, ttl = self._resolve(config)
        except (Exception, DeadlineExceeded) as exc:  # every failure is answered
            return self._reject(self.failure(exc))
        return self._instantiate(plaintext, ttl)

    def failure(self, exc: BaseException) -> ResolverError:
        """The class a failure is answered with: once the watchdog has fired, always EAGAIN."""
        if isinstance(exc, DeadlineExceeded):
            return UnavailableError("deadline exceeded before KMS answered")
        if self.watchdog.fired:
            # The signal surfaced as another exception (inside an import or a class creation,
            # say): a missed deadline, never a cached refusal.
            what = exc.reason if isinstance(exc, ResolverError) else type(exc).__name__
            return UnavailableError(f"deadline exceeded ({what})")
        if isinstance(exc, ResolverError):
            return exc
        if isinstance(exc, ImportError):
            # A resolver installed without its dependencies: loud (ERR), and not cached.
            return UnavailableError(
                f"missing dependency {exc.name or exc}: pip install 'kmskeys[resolver]'"
            )
        # A bug must still reject: a key left under construction would be negated silently.
        return RefusedError(f"internal error: {type(exc).__name__}")

    def _load_config(self) -> config_mod.Config:
        if self.preloaded is not None:
            config = self.preloaded
        else:
            try:
                config = config_mod.load(self.args.config)
            except ConfigError:
                # A trusted file with a mistake elsewhere still says where its lines go.
                found = config_mod.log_settings(self.args.config)
                if found is not None:
                    self.log = SyslogWriter(found[0], config_mod.FACILITIES[found[1]])
                raise
        self.log = SyslogWriter(config.syslog_socket, config_mod.FACILITIES[config.syslog_facility])
        self.negative_ttl = config.negative_ttl
        return config

    def _resolve(self, config: config_mod.Config) -> tuple[bytes, int]:
        args = self.args
        try:
            prefix, name, qualifier = split_description(config, args.description)
        except InvalidNameError as exc:
            raise RefusedError(str(exc)) from None
        self.name = name
        self.user = user_name(args.uid)
        check_allowed(config, name, args.uid, self.user, prefix)
        request = Request(
            prefix=prefix,
            name=name,
            uid=args.uid,
            gid=args.gid,
            user=self.user,
            callout=self.callout,
            qualifier=qualifier,
        )
        backend = backend_for(config, request.prefix)
        plaintext = backend.resolve(
            request, self.started + config.deadline - WATCHDOG_MARGIN, self.trace
        )
        if not plaintext or len(plaintext) > USER_PAYLOAD_MAX:
            raise RefusedError(f"plaintext size {len(plaintext)} is outside 1..{USER_PAYLOAD_MAX}")
        ttl = self.trace.stale_ttl or config.ttl_for(name, prefix)
        return plaintext, spread(ttl, config.ttl_jitter)

    def _instantiate(self, plaintext: bytes, ttl: int) -> int:
        key = self.key
        try:
            # Ownership, permissions and expiry are set before instantiation, so no waiter ever
            # sees the key with the kernel's defaults.
            # The admin group lets root's `kmskeys flush` find and invalidate the key (VIEW,
            # SEARCH), never read or link it; a host without the group keeps %g and no group bits.
            gid = admin_group()
            key.chown(self.args.uid, self.args.gid if gid is None else gid)
            key.setperm(RESOLVED_KEY_PERM if gid is None else ADMIN_KEY_PERM)
            key.set_timeout(ttl)
            key.instantiate(plaintext, 0)
        except QuotaExceededError as exc:
            return self._reject(QuotaError(f"requester's key quota is full: {exc.strerror}"))
        except KmsKeysError as exc:
            return self._reject(RefusedError(f"instantiate failed: {exc}"))
        if self.trace.stale_ttl is not None:
            # Served from an older host-cache entry because KMS is unavailable: say so loudly.
            self._emit(LOG_WARNING, "stale", ttl=ttl, reason=self.trace.details.get("reason"))
        else:
            self._emit(LOG_INFO, "ok", ttl=ttl)
        return 0

    def _reject(self, error: ResolverError) -> int:
        try:
            self.key.reject(self.negative_ttl, error.answer_errno, 0)
        except KmsKeysError as exc:
            reason = f"{error.reason}; reject failed: {exc}"
            self._emit(LOG_ERR, error.outcome, errno=errno_name(error.answer_errno), reason=reason)
            return 1
        severity = LOG_ERR if error.alarm else LOG_WARNING
        self._emit(
            severity, error.outcome, errno=errno_name(error.answer_errno), reason=error.reason
        )
        return 0

    def _emit(self, severity: int, outcome: str, **extra: object) -> None:
        elapsed = (time.monotonic() - self.started) * 1000
        message = format_fields(
            uid=self.args.uid,
            user=self.user,
            name=self.name if self.name is not None else self.args.description,
            key=self.args.key,
            outcome=outcome,
            source=self.trace.details.get("source"),
            mode=self.trace.details.get("mode"),
            age=self.trace.details.get("age"),
            **extra,
            ms=f"{elapsed:.0f}",
            t=str(self.trace.timings) or None,
        )
        self.log.emit(severity, message)


def spread(ttl: int, jitter: float) -> int:
    """`ttl` times a random factor in [1 - jitter, 1 + jitter], in whole seconds, at least 1.

    The kernel keeps key expiry in whole seconds (and a timeout of T lasts T-1 to T s), so the
    spread only shows once ttl * jitter reaches half a second: ttl 4 or less never moves at 10 %.
    """
    if not jitter:
        return ttl
    factor = 1.0 + jitter * (int.from_bytes(os.urandom(4)) / 0xFFFFFFFF * 2.0 - 1.0)
    return max(1, round(ttl * factor))


def admin_group() -> int | None:
    """The gid of the admin group if it exists and has no members, else None.

    A member would get group SEARCH on every key, and with it possession of a key in any keyring
    it holds, and possession reads: a group that gained members is never used.
    """
    import grp

    try:
        group = grp.getgrnam(ADMIN_GROUP)
    except KeyError:
        return None
    return None if group.gr_mem else group.gr_gid


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
        SyslogWriter(config_mod.DEFAULT_SYSLOG_SOCKET, config_mod.FACILITIES["authpriv"]).emit(
            LOG_ERR, format_fields(outcome="error", reason=str(exc))
        )
        return 2
    if config is not None and config.path != args.config:
        config = None
    return Handler(args, started, config).run()
