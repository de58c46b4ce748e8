"""One miss in the resolver daemon: from the gate's REQUEST to the request's one log line.

The connection's thread receives the request and the slot fd the gate holds (resolver/wire.py),
checks what the supervisor checks (the gate's build, the slot) and accepts; the pipeline runs in
a thread of its own holding the slot, while this thread waits for it, the deadline or the gate
to go away. The gate answers the key from the Outcome and reports what the kernel said; the
line is resolver/answer.py's from that report (resolver/daemon_gate.py ReplayKey): the
handler's line exactly. A gate that says ABANDON has answered or fallen back and logged; one
that vanishes is logged at ERR.

The requester's view (the gate's read of /proc/keys, issue 24) is asked for only when the
pipeline must identify the requester: from the pipeline's thread, VIEW_ASK and the gate's VIEW
on the connection, which the connection's thread leaves alone meanwhile (`_wire`).

The daemon lets go of its copy of the slot before it sends its last word to the gate (the
OUTCOME, or DECLINED): the requester wakes up when the gate exits, and its next miss must find
the slot free, not held by this thread's bookkeeping (its log line, refresh-ahead's record),
which a loaded host or a slow log can stretch. Only a pipeline still running past its
deadline keeps the slot beyond that (Resolution holds a copy of its own).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Protocol

from resolver import config as config_mod
from resolver import pipeline, wire
from resolver.answer import answer, flushed, log_writer
from resolver.daemon_gate import (
    ReplayKey,
    facts_of,
    flushed_meanwhile,
    identity,
    outcome_message_of,
    started_at,
    unflushed,
)
from resolver.errors import (
    ConfigError,
    DeadlineExceeded,
    IdentityUnclearError,
    ResolverError,
    UnavailableError,
    failure,
)
from resolver.handler import WATCHDOG_MARGIN
from resolver.keyrecords import remember
from resolver.limits import busy_reason, charged_uid, check_slot, gate_stamp_problem
from resolver.log import LOG_ERR, SyslogWriter
from resolver.outcome import Outcome
from resolver.pipeline import KernelRequest

if TYPE_CHECKING:
    from pathlib import Path

    from resolver.workers import Workers


class Configs(Protocol):
    """Where the daemon's config comes from (resolver/daemon.py ConfigCache)."""

    path: Path

    def current(self) -> config_mod.Config:
        """The config as its file says now; ConfigError when it does not load."""
        ...


class Daemon(Protocol):
    """What a request needs of the daemon (resolver/daemon.py Daemon)."""

    stopping: threading.Event
    workers: Workers

    @property
    def configs(self) -> Configs:
        """Where its config comes from."""
        ...

    def leave(self) -> None:
        """Count a request out."""
        ...


_UCRED = struct.Struct("=iII")  # struct ucred (socket(7), SO_PEERCRED)
RECEIVE_TIMEOUT = 2.0  # the gate sends its request as soon as it is connected
REPORT_TIMEOUT = 5.0  # the gate answers the key in a few system calls
GATE_GRACE = 1.0  # the gate waits this long past the deadline before it answers by itself
POLL_SLICE = 0.05  # how often a waiting request looks whether its gate is still there
NEGATIVE_TTL = 10  # a rejection's ttl when the config cannot be read (the handler's default)


class GateGone(Exception):
    """The gate went away: `abandoned` when it said so (it answers or falls back itself)."""

    def __init__(self, abandoned: bool) -> None:
        super().__init__("abandoned" if abandoned else "vanished")
        self.abandoned = abandoned


def serve_connection(daemon: Daemon, conn: socket.socket) -> None:
    """The thread of one gate connection (counted in by the accept loop)."""
    ticket = Ticket(daemon)
    try:
        with conn:
            Miss(daemon, conn, ticket).run()
    finally:
        ticket.drop()


class Ticket:
    """A request's place among the daemon's MAX_ACTIVE: left when its connection and its
    pipeline are both done (a pipeline past its deadline still runs, and still counts)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._holders = 1
        self._lock = threading.Lock()

    def share(self) -> None:
        """One more holder (the pipeline's thread)."""
        with self._lock:
            self._holders += 1

    def drop(self) -> None:
        """One holder done; the last one counts the request out."""
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self.daemon.leave()


class Miss:
    """One gate connection: receive, admit, resolve, hand over, log."""

    def __init__(self, daemon: Daemon, conn: socket.socket, ticket: Ticket) -> None:
        self.daemon, self.conn, self.ticket = daemon, conn, ticket
        self.slot: int | None = None
        self.log: SyslogWriter = log_writer()
        # What was resolved under which config, for refresh-ahead's record of the key.
        self.resolved: tuple[KernelRequest, config_mod.Config] | None = None
        self.deadline = 0.0
        # The connection, one thread at a time: the pipeline's asking for the view, or this
        # one's (closed: this thread is done with it, and no one may use it any more).
        self._wire = threading.Lock()
        self._closed = False
        self._asked = False
        self._view: wire.GateView | None = None
        self._abandon_seen = False

    def run(self) -> None:
        """Serve the connection; the slot fd is closed on every path (or by the pipeline)."""
        try:
            self._run()
        finally:
            self._release()
            with self._wire:
                self._closed = True

    def _release(self) -> None:
        """Close this thread's copy of the requester's slot (module doc: before the gate's
        last answer, so that the requester's next miss never finds it held by us)."""
        slot, self.slot = self.slot, None
        if slot is not None:
            os.close(slot)

    def _run(self) -> None:
        conn = self.conn
        pid, uid, _ = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        if uid != 0:
            return  # only the root gate may ask: close without a word
        conn.settimeout(RECEIVE_TIMEOUT)
        try:
            body, fds = wire.receive_request(conn)
        except (OSError, wire.WireError):
            return  # a broken gate gets nothing: it runs the handler
        self.slot = fds.pop(0) if len(fds) == 1 else None
        for extra in fds:
            os.close(extra)
        try:
            request = wire.GateRequest(body)
        except wire.WireError:
            return
        if self.slot is None or self.daemon.stopping.is_set() or not self._ours(request):
            self._release()
            self._send(wire.header(wire.DECLINED, b""))
            return
        self._serve(request, started_at(request, pid))

    def _ours(self, request: wire.GateRequest) -> bool:
        """Whether the gate's rule names this daemon's config: a miss of another install that
        shares the socket goes to its own handler, never to this config's answers."""
        asked = request.config or os.fspath(config_mod.DEFAULT_PATH)
        return os.path.abspath(asked) == os.path.abspath(self.daemon.configs.path)

    def _serve(self, request: wire.GateRequest, started: float) -> None:
        asked = KernelRequest(
            request.key,
            os.fsdecode(request.description),
            request.uid,
            request.gid,
            callout=request.callout,
            **identity(request, self._ask_view),
        )
        path = self.daemon.configs.path
        try:
            config = self.daemon.configs.current()
        except ConfigError as exc:
            self.log = log_writer(found=config_mod.log_settings(path))
            self._answer(pipeline.rejection(asked, exc, NEGATIVE_TTL), started, started)
            return
        self.log = log_writer(config)
        self.resolved = asked, config
        deadline = self.deadline = started + config.deadline - WATCHDOG_MARGIN
        refused = self._admit(request, config)
        if refused is None and self.slot is None:
            self._send(wire.header(wire.DECLINED, b""))  # not a slot of this config's
            return
        if refused is not None:
            outcome = pipeline.rejection(
                asked, refused, config.negative_ttl, facts=facts_of(asked, config)
            )
            self._answer(outcome, started, deadline)
            return
        self._resolve(asked, config, started, deadline)

    def _admit(self, request: wire.GateRequest, config: config_mod.Config) -> ResolverError | None:
        """Why the request is answered EAGAIN at once, as the supervisor would; None to resolve
        it (or, with self.slot dropped, to decline it: the handler sorts that slot out)."""
        stale = gate_stamp_problem(request.stamp)
        if stale is not None:
            return UnavailableError(stale)
        assert self.slot is not None
        charged = charged_uid(config, request.uid)
        slots = config.max_concurrent_per_uid
        allowed = check_slot(self.slot, config.state_dir, charged, slots)
        if allowed is None:
            os.close(self.slot)
            self.slot = None
            return None
        return None if allowed else UnavailableError(busy_reason(request.uid, charged, slots))

    def _resolve(
        self, asked: KernelRequest, config: config_mod.Config, started: float, deadline: float
    ) -> None:
        if not self._accept(deadline):
            return
        try:
            outcome = self._pipeline(asked, config, deadline)
            if flushed(outcome) and time.monotonic() < deadline:
                # Root flushed the name meanwhile: resolved anew, once, as the handler does
                # (resolver/answer.py); flushed again, _answer makes it EAGAIN.
                outcome = self._pipeline(asked, config, deadline)
        except GateGone as gone:
            if not gone.abandoned:
                self._vanished(asked, config, started)
            return
        self._answer(outcome, started, deadline, accepted=True)

    def _pipeline(
        self, asked: KernelRequest, config: config_mod.Config, deadline: float
    ) -> Outcome:
        """The pipeline's Outcome, from a thread holding a copy of the slot until it is done;
        GateGone if the gate left."""
        resolution = Resolution(asked, config, deadline)
        assert self.slot is not None
        slot = os.dup(self.slot)
        self.ticket.share()
        try:
            resolution.start(self.daemon.workers, slot, self.ticket)
        except RuntimeError:  # no thread to be had: answered EAGAIN, never left waiting
            os.close(slot)
            self.ticket.drop()
            error = UnavailableError("the resolver daemon could not start a thread")
            resolution.finish(pipeline.rejection(asked, error, config.negative_ttl))
        return self._wait(resolution, deadline)

    def _accept(self, deadline: float) -> bool:
        wait = max(0.0, deadline - time.monotonic()) + GATE_GRACE
        ms = min(wire.OUTCOME_WAIT_MAX_MS, int(wait * 1000))
        return self._send(wire.header(wire.ACCEPTED, wire.ACCEPTED_BODY.pack(ms)))

    def _wait(self, resolution: Resolution, deadline: float) -> Outcome:
        """The pipeline's Outcome, or EAGAIN at the deadline; GateGone if the gate left."""
        while not resolution.done.wait(min(POLL_SLICE, max(0.0, deadline - time.monotonic()))):
            self._check_gate()
            if time.monotonic() >= deadline:
                error = failure(DeadlineExceeded(), True)
                return pipeline.rejection(
                    resolution.asked,
                    error,
                    resolution.config.negative_ttl,
                    facts=facts_of(resolution.asked, resolution.config),
                )
        assert resolution.outcome is not None
        return resolution.outcome

    def _abandoned(self) -> bool:
        """Whether the gate said ABANDON (it answered or fell back, and logged) before it left."""
        try:
            self._check_gate()
        except GateGone as gone:
            return gone.abandoned
        return False

    def _check_gate(self) -> None:
        if self._abandon_seen:
            raise GateGone(True)
        if not self._wire.acquire(blocking=False):
            return  # the pipeline is asking for the view: its answer says whether the gate is there
        try:
            # Non-blocking: with a timeout set, Python would first wait for the socket to be ready.
            self.conn.settimeout(0)
            try:
                data = self.conn.recv(wire.HEADER.size, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                raise GateGone(False) from None
            raise GateGone(wire.is_abandon(data))
        finally:
            self._wire.release()

    def _ask_view(self) -> wire.GateView:
        """The gate's VIEW of the request, asked for once, from the pipeline's thread, when it
        must identify the requester; IdentityUnclearError (EAGAIN) when the gate gives none."""
        with self._wire:
            if self._view is None:
                if self._asked or self._closed:
                    raise IdentityUnclearError("kmskeys-gate gave no view of the request")
                self._asked = True
                self._view = self._fetch_view()
            return self._view

    def _fetch_view(self) -> wire.GateView:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded
        try:
            self.conn.settimeout(min(REPORT_TIMEOUT, left))
            self.conn.sendall(wire.header(wire.VIEW_ASK, b""))
            kind, body = wire.read_message(self.conn, wire.VIEW_MAX)
            if kind == wire.VIEW:
                return wire.GateView(body)
            # The gate gave up waiting (it answers or falls back itself, and logs).
            self._abandon_seen = kind == wire.ABANDON
            problem = f"it sent {wire.NAMES[kind]}"
        except (OSError, wire.WireError) as exc:
            problem = str(exc) or type(exc).__name__
        raise IdentityUnclearError(f"kmskeys-gate gave no view of the request: {problem}")

    def _answer(
        self, outcome: Outcome, started: float, deadline: float, *, accepted: bool = False
    ) -> None:
        """Send the Outcome, wait for the gate's REPORT, write the line from it."""
        # No pipeline of ours runs for this request any more (one past its deadline holds a
        # copy of its own): the slot is the gate's alone from here on.
        self._release()
        if self._abandon_seen:
            return  # the gate said ABANDON instead of a view: it answers or falls back, and logs
        if not accepted and not self._accept(deadline):
            return
        outcome, tokens = unflushed(outcome)
        if not self._send(outcome_message_of(outcome, tokens)):
            if not self._abandoned():
                self._gone_after(outcome, started)
            return
        try:
            with self._wire:
                self.conn.settimeout(REPORT_TIMEOUT)
                kind, body = wire.read_message(self.conn, wire.REPORT_BODY.size)
            report = wire.Report(body) if kind == wire.REPORT else None
        except (OSError, wire.WireError):
            self._gone_after(outcome, started)
            return
        if report is not None:
            if report.step == wire.STEP_FLUSHED:
                outcome = flushed_meanwhile(outcome)
            if report.step == wire.STEP_NONE and outcome.answered and self.resolved is not None:
                # The gate instantiated the key: the refresher (`kmskeys-resolver refresh`)
                # renews it before it expires. Recorded before the line is written, so that a
                # reader of the log finds the record there.
                asked, config = self.resolved
                remember(config, asked, outcome, time.clock_gettime(time.CLOCK_BOOTTIME))
            answer(ReplayKey(report), outcome, self.log, started)
        # ABANDON: the gate found the answer unacceptable, logged that and runs the handler.

    def _gone_after(self, outcome: Outcome, started: float) -> None:
        reason = f"{outcome.reason or outcome.outcome}; kmskeys-gate went away before reporting"
        line = outcome.replace(reason=reason).line((time.monotonic() - started) * 1000)
        self.log.emit(LOG_ERR, line)

    def _vanished(self, asked: KernelRequest, config: config_mod.Config, started: float) -> None:
        error = UnavailableError(
            "kmskeys-gate went away before the answer: the kernel negates the key (ENOKEY)"
        )
        outcome = pipeline.rejection(
            asked, error, config.negative_ttl, facts=facts_of(asked, config)
        )
        self.log.emit(LOG_ERR, outcome.line((time.monotonic() - started) * 1000))

    def _send(self, data: bytes) -> bool:
        try:
            with self._wire:
                self.conn.settimeout(REPORT_TIMEOUT)
                self.conn.sendall(data)
        except OSError:
            return False
        return True


class Resolution:
    """The pipeline for one request, in a thread of its own that holds the request's slot."""

    def __init__(self, asked: KernelRequest, config: config_mod.Config, deadline: float) -> None:
        self.asked, self.config, self.deadline = asked, config, deadline
        self.outcome: Outcome | None = None
        self.done = threading.Event()

    def start(self, workers: Workers, slot: int, ticket: Ticket) -> None:
        """Run the pipeline; the thread closes `slot` and drops `ticket` when it is done."""
        workers.submit(lambda: self._run(slot, ticket))

    def finish(self, outcome: Outcome) -> None:
        """The request's Outcome is known."""
        self.outcome = outcome
        self.done.set()

    def _run(self, slot: int, ticket: Ticket) -> None:
        asked, config, deadline = self.asked, self.config, self.deadline

        def fired() -> bool:
            # No watchdog in a thread: past the deadline, any failure is EAGAIN.
            return time.monotonic() >= deadline

        try:
            outcome = pipeline.resolve(asked, config, deadline, fired=fired)
        except BaseException as exc:  # resolve never raises; whatever did is answered
            outcome = pipeline.rejection(asked, failure(exc, fired()), config.negative_ttl)
        finally:
            os.close(slot)
            ticket.drop()
        self.finish(outcome)
