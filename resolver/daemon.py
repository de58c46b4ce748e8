"""`kmskeys-resolver serve`: the resolver daemon, so that a miss starts no interpreter.

kmskeys-gate (resolver/gate.c), run by request-key for every miss, takes the requester's slot
and hands the request to this daemon over a root-only unix socket (the wire: resolver/wire.py).
The daemon resolves it with the same pipeline as the handler (resolver/pipeline.py: policy,
allowlist, the uid's bucket, the host cache, stale answers), in a thread of its own, and tells
the gate how to answer; the gate answers the key and reports what the kernel said, and the
daemon writes the request's one log line (resolver/daemon_request.py). A slow KMS call of one
uid holds that request's thread alone, never another uid's miss.

What keeps it bounded under a hostile flood: the gate's flock slots come first, so at most
`max_concurrent_per_uid` requests of a uid (of a subuid range's owner) ever reach the daemon,
each holding its slot; and the daemon takes at most MAX_ACTIVE requests at once, declining the
rest to the handler (today's cold path, with the same slots). A request's threads come from
resolver/workers.py: kept warm between misses, never shared by two requests at once.

Trust runs both ways and rests on the kernel's peer credentials (SO_PEERCRED): the daemon
serves uid 0 alone, and the gate believes only a socket of root's, in a root-owned directory,
whose listener is uid 0. The daemon re-validates everything the gate sends.
"""

from __future__ import annotations

import functools
import gc
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kmskeys import fileio
from kmskeys.lowlevel.process import disable_core_dumps
from resolver import config as config_mod
from resolver import wire
from resolver.awsclient import keep_clients, warm_clients
from resolver.errors import ConfigError
from resolver.workers import Workers

# Requests in the daemon at once (each a thread, plus its pipeline's): beyond, the gate runs the
# handler. The gate's slots bound each uid far below this.
MAX_ACTIVE = 256
# What a request's threads may use of the stack: the pipeline, botocore and TLS stay well within.
THREAD_STACK = 1 << 20
# The scheduler's weight of the daemon's session (its autogroup, sched(7)), as a nice value.
# With autogroups on (most distributions' default), a session's processes share one CPU weight,
# while each /sbin/request-key and kmskeys-gate the kernel starts for an upcall is a task of its
# own in the root group: a uid firing 200 upcalls at once made 200 such tasks against the
# daemon's one weight, and another uid's miss waited 100-400 ms for the daemon to be scheduled
# at all (the flood row of `make bench`). At -10 (about nine nice-0 tasks' worth) it is
# scheduled through such a burst, and it is idle but for the misses it is handed.
AUTOGROUP_NICE = -10
AUTOGROUP = Path("/proc/self/autogroup")


class ConfigCache:
    """The daemon's config, loaded again when its file changes (one stat per request), so that
    an edit takes effect at the next miss, as it does for the handler."""

    def __init__(self, config: config_mod.Config) -> None:
        self.path = config.path
        self._config: config_mod.Config | None = config
        self._error: ConfigError | None = None
        self._seen = self._identity()
        self._lock = threading.Lock()

    def _identity(self) -> tuple[int, ...] | None:
        # The directory too: the handler refuses a config whose directory others may write,
        # and so must the daemon, from the next miss on (a chmod changes the ctime).
        try:
            st, parent = os.stat(self.path), os.stat(self.path.parent)
        except OSError:
            return None
        file = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        return (*file, parent.st_ino, parent.st_ctime_ns)

    def current(self) -> config_mod.Config:
        """The config as its file says now; ConfigError when it no longer loads."""
        seen = self._identity()
        with self._lock:
            if seen != self._seen or seen is None:
                self._seen = seen
                try:
                    self._config, self._error = config_mod.load(self.path), None
                except ConfigError as exc:
                    self._config, self._error = None, exc
            if self._config is None:
                assert self._error is not None
                raise self._error
            return self._config


class Daemon:
    """The socket, the accept loop and the count of requests in flight."""

    def __init__(self, config: config_mod.Config) -> None:
        if config.warm_socket is None:
            raise ConfigError(f"config {config.path}: set warm_socket to run the resolver daemon")
        self.configs = ConfigCache(config)
        self.path: Path = config.warm_socket
        self.listener: socket.socket | None = None
        self.stopping = threading.Event()
        self._inode: int | None = None
        self._active = 0
        self._idle = threading.Condition()
        # Every thread of a request (its connection's, its pipeline's), kept warm between misses.
        self.workers = Workers("kmskeys-serve")

    def bind(self) -> None:
        """Create the root-only socket, replacing a stale one atomically."""
        parent = self.path.parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            label = f"warm_socket directory {parent}"
            fileio.check_path(parent, label, fileio.DIRECTORY, fileio.FOLLOW)
        except fileio.UntrustedFileError as exc:
            raise ConfigError(str(exc), refusal=exc) from None
        temp = parent / f".{self.path.name}.{os.getpid()}"
        temp.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            listener.bind(os.fspath(temp))
        finally:
            os.umask(old_umask)
        # A burst of misses from many uids waits in the backlog, not in a refused connect.
        listener.listen(min(socket.SOMAXCONN, 4096))
        os.replace(temp, self.path)
        self._inode = os.lstat(self.path).st_ino
        self.listener = listener

    def serve_forever(self) -> None:
        """Accept connections until shutdown(); each request gets threads of its own."""
        from resolver.daemon_request import serve_connection

        assert self.listener is not None
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(0.01)  # EMFILE and the like: never spin
                continue
            if not self.enter():
                _decline(conn)
                continue
            try:
                self.workers.submit(functools.partial(serve_connection, self, conn))
            except RuntimeError:  # no thread to be had: the handler answers instead
                self.leave()
                _decline(conn)

    def enter(self) -> bool:
        """Count a request in, unless MAX_ACTIVE are in flight or the daemon is stopping."""
        with self._idle:
            if self._active >= MAX_ACTIVE or self.stopping.is_set():
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        """Count a request out (its pipeline and its connection are both done)."""
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    @property
    def active(self) -> int:
        """Requests in flight."""
        return self._active

    def shutdown(self, grace: float) -> None:
        """Stop accepting, remove our socket (never a newer daemon's), and give the requests in
        flight up to `grace` seconds to be answered."""
        self.stopping.set()
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        try:
            if os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, grace)


def _decline(conn: socket.socket) -> None:
    """Tell the gate to run the handler instead (it may be mid-send: never block on it)."""
    with conn:
        try:
            conn.setblocking(False)
            conn.send(wire.header(wire.DECLINED, b""))
        except OSError:
            pass  # the gate falls back on a closed connection just the same


def _warm_up(config: config_mod.Config) -> None:
    """What the first miss would otherwise pay for: the backends, botocore's models and one
    client per service the config reads and configured region (kept: awsclient.keep_clients)."""
    import resolver.blobs
    import resolver.daemon_request
    import resolver.stored

    if config.sm_secrets:
        import resolver.secretsmanager
    if config.ssm_parameters:
        import resolver.parameterstore  # noqa: F401
    for problem in warm_clients(config):
        print(f"kmskeys-resolver serve: {problem}", file=sys.stderr)


def settle_heap() -> None:
    """Keep what the warm-up loaded out of every later garbage collection (gc.freeze).

    The warm-up leaves the interpreter some 60,000 long-lived objects (botocore's models and
    clients, the backends), and a full collection walks every one of them: 20-50 ms with every
    thread of the daemon stopped, twice in a ten-second flood row, on whichever miss was in
    flight (gc.callbacks; docs/resolver.md). Frozen, they are never scanned again (a full
    collection then takes 0.3 ms); what misses allocate is collected as before. What the warm-up
    made and later drops stays allocated: a fixed amount, made once."""
    gc.collect()
    gc.freeze()


def claim_cpu_share(autogroup: Path = AUTOGROUP) -> str | None:
    """Weigh the daemon's session as AUTOGROUP_NICE says in the scheduler (None), or say why
    not. Only a session of its own (a service's: systemd starts each in one) is ever raised."""
    if os.getsid(0) != os.getpid():
        return (
            "not the leader of its own session: it shares its session's CPU weight, which a "
            "flood of upcalls (each request-key a task of its own) can starve (docs/resolver.md)"
        )
    try:
        fd = os.open(autogroup, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # a kernel without autogroups: a cgroup's CPUWeight= is what counts there
    except OSError as exc:
        return f"cannot weigh its session in the scheduler ({autogroup}: {exc.strerror})"
    try:
        os.write(fd, str(AUTOGROUP_NICE).encode())
    except OSError as exc:  # EPERM without CAP_SYS_NICE
        return f"cannot weigh its session in the scheduler ({autogroup}: {exc.strerror})"
    finally:
        os.close(fd)
    return None


def _scrub_environment() -> None:
    # The resolver's settings come from its root-owned config only (as in the handler).
    for var in list(os.environ):
        if var.startswith(("AWS_", "BOTO_")):
            del os.environ[var]


def serve(config: config_mod.Config, ready: Callable[[], None] | None = None) -> int:
    """Run the resolver daemon until SIGTERM or SIGINT, then finish what is in flight."""
    # Every plaintext it serves passes through it: no core file may ever hold one.
    disable_core_dumps()
    _scrub_environment()
    keep_clients()
    threading.stack_size(THREAD_STACK)
    problem = claim_cpu_share()
    if problem is not None:
        print(f"kmskeys-resolver serve: {problem}", file=sys.stderr)
    _warm_up(config)
    settle_heap()
    daemon = Daemon(config)
    daemon.bind()

    def stop(signum: int, _frame: object) -> None:
        daemon.stopping.set()
        listener = daemon.listener
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"kmskeys-resolver serve: listening on {daemon.path}", file=sys.stderr, flush=True)
    if ready is not None:
        ready()
    try:
        daemon.serve_forever()
    finally:
        daemon.shutdown(grace=_grace(daemon))
    return 0


def _grace(daemon: Daemon) -> float:
    try:
        return daemon.configs.current().deadline + 2.0
    except ConfigError:
        return 10.0
