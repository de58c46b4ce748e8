"""Run the handler in a worker process, so that its death, however it comes, still gets an answer.

A request-key program that exits without instantiating or rejecting the key leaves the kernel to
negate it with ENOKEY for 60 seconds. No sysctl changes that timeout, so a handler killed by the
OOM killer or by an operator (SIGKILL), or one that crashes in C code, would make the name
unresolvable for a minute. The parent waits for the worker and kills it if it outlives the
deadline, which backs up the worker's own SIGALRM watchdog. If the worker left the key
unanswered, the parent rejects it with EAGAIN, which the kernel never caches, and logs why.

The parent forks after the handler's imports, so the worker pays nothing extra for them. The
requester that started the upcall waits for request-key, which waits for this parent.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Sequence

from kmskeys.contract import DEFAULT_PREFIX
from kmskeys.errors import InvalidNameError
from kmskeys.lowlevel import Key
from kmskeys.lowlevel.process import disable_core_dumps
from kmskeys.names import parse_description
from resolver import config as config_mod
from resolver import handler
from resolver.answer import answer_unanswered, log_writer
from resolver.errors import ResolverError, UnavailableError
from resolver.limits import (
    acquire_slot,
    busy_reason,
    charged_uid,
    inherited_slot,
    stale_gate,
)
from resolver.pipeline import KernelRequest, rejection
from resolver.registry import split_description

# How long past the deadline the parent lets a worker run: the worker's watchdog fires
# WATCHDOG_MARGIN before the deadline, so a live worker has always answered by then.
BACKSTOP_GRACE = 0.25


def supervise(argv: Sequence[str]) -> int:
    """Run `handler.main(argv)` in a worker; answer the kernel if the worker could not."""
    started = handler.process_started()
    disable_core_dumps()  # inherited by the worker
    try:
        args: handler.HandleArgs | None = handler.parse_args(argv)
    except ValueError:
        args = None  # the worker logs the bad argv; there is no key to answer
    config = _config(args) if args is not None else None
    slot: int | None = None
    if args is not None:
        # Before any fork or import: a stale gate, or a uid with all its slots busy, is
        # answered EAGAIN now.
        refused, slot = _admit(args, config)
        if refused is not None:
            return _answer(args, config, refused, started)
        # The worker inherits the slot and holds it until it exits, right after answering.
    try:
        pid = os.fork()
    except OSError:
        # No process to spare (EAGAIN, ENOMEM): handle in this process, unsupervised, rather
        # than die unanswered and leave the name negated for a minute.
        return handler.main(argv, started)
    if pid == 0:  # the worker
        code = 1
        try:
            # The config parsed above is the worker's too: no second read and parse.
            code = handler.main(argv, started, config)
        finally:
            sys.stderr.flush()
            os._exit(code)  # never return into the parent's code
    if slot is not None:
        # Not this process's teardown too: a requester that got its answer and asks again at
        # once must find the slot free.
        os.close(slot)
    if args is None:
        _wait(pid, None)
        return 2
    deadline = started + (config.deadline if config else handler.DEFAULT_DEADLINE)
    status = _wait(pid, deadline + BACKSTOP_GRACE)
    if status is None:
        how = "killed past its deadline"
    elif os.WIFSIGNALED(status):
        how = f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    else:
        how = f"exited with status {os.waitstatus_to_exitcode(status)}"
    error = UnavailableError(f"resolver worker {how} before answering")
    return _answer(args, config, error, started)


def _admit(
    args: handler.HandleArgs, config: config_mod.Config | None
) -> tuple[ResolverError | None, int | None]:
    """(why the request is answered EAGAIN now, or None; the slot fd the worker will hold)."""
    stale = stale_gate()
    if stale is not None:
        return UnavailableError(stale), None
    if config is None:
        return None, None  # the worker refuses the config and logs why
    slots = config.max_concurrent_per_uid
    try:
        # A subordinate uid's slots are its range owner's (kmskeys-gate charges the same).
        charged = charged_uid(config, args.uid)
        slot, allowed = inherited_slot(config.state_dir, charged, slots)
        if slot is None:
            slot = acquire_slot(config.state_dir, charged, slots)
    except ResolverError as exc:
        return exc, None
    if slot is None or not allowed:
        return UnavailableError(busy_reason(args.uid, charged, slots)), slot
    return None, slot


def _config(args: handler.HandleArgs) -> config_mod.Config | None:
    try:
        return config_mod.load(args.config)
    except ResolverError:
        return None  # the worker refuses and logs that; the defaults serve the backstop


def _name(description: str, config: config_mod.Config | None) -> str:
    # Log the name as the handler does; a description it could not parse is logged whole.
    try:
        if config is not None:
            return split_description(config, description)[1]
        return parse_description(description, DEFAULT_PREFIX)
    except InvalidNameError:
        return description


def _wait(pid: int, deadline: float | None) -> int | None:
    """The worker's wait status; None if it had to be killed at `deadline`."""
    if deadline is None:
        return os.waitpid(pid, 0)[1]
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
        return os.waitpid(pid, 0)[1]
    finally:
        os.close(pidfd)


def _answer(
    args: handler.HandleArgs,
    config: config_mod.Config | None,
    error: ResolverError,
    started: float,
) -> int:
    """Reject the key with `error` and log it, unless it has been answered already."""
    asked = KernelRequest(args.key, args.description, args.uid, args.gid)
    ttl = config.negative_ttl if config else handler.DEFAULT_NEGATIVE_TTL
    outcome = rejection(asked, error, ttl, facts={"name": _name(args.description, config)})
    return answer_unanswered(Key(args.key), outcome, log_writer(config), started)
