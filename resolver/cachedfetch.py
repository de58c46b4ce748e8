"""A request through the host cache: a fresh entry answers; else one refresh per host, and a
stale entry when the service is unavailable, without the stall.

`Through(config, cache, desc, refresh, request, label).fetch(context)` is what a backend calls
once its checks have passed (resolver/blobs.py for `kms:`; any backend whose answers the host
cache may keep, under a description of its own); `refresh(context)` makes the AWS call(s):

1. a fresh entry (younger than the name's ttl) answers, with no AWS call;
2. otherwise the entry's refresh lock is taken (one refresh per host: handlers of other
   keyrings that missed at the same moment wait, then find it fresh) and `refresh` runs;
3. if an entry within `stale_grace` is at hand, the request waits for the service at most
   `stale_wait`: past it, the entry answers stale (with `stale_ttl`), and the refresh goes on
   in the background (resolver/background.py) and fills the cache when the service answers.
   Without such an entry there is nothing better to answer with: the request waits, up to its
   deadline, as before;
4. a refusal is never masked: it purges the entry and reaches the requester; only an
   unavailable service (ServiceUnavailableError, the deadline) is answered stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kmskeys import flushepoch
from resolver import background
from resolver.backend import Context, Request, Result
from resolver.errors import (
    DeadlineExceeded,
    RefusedError,
    ResolverError,
    ServiceUnavailableError,
    UnknownSecretError,
    failure,
)
from resolver.hostcache import REFRESH_WAIT, Cache, Entry, RefreshLock
from resolver.limits import BACKGROUND_PREFIX, acquire_slot, charged_uid

if TYPE_CHECKING:
    from resolver.config import Config

Refresh = Callable[[Context], bytes]


class Through:
    """One request's way through the host cache: the entry `desc`, the `refresh` that asks the
    service (`label`, as reasons name it) within a Context, and who asks."""

    def __init__(
        self,
        config: Config,
        cache: Cache,
        desc: str,
        refresh: Refresh,
        *,
        request: Request,
        label: str = "KMS",
    ) -> None:
        self.config, self.cache, self.desc = config, cache, desc
        self.refresh, self.request, self.label = refresh, request, label
        self.epoch = bytes(8)  # the request's flush epoch, set by fetch

    def fetch(self, context: Context) -> Result:
        """The answer for this request: from the cache, the service, or stale (module doc)."""
        ttl = self.config.ttl_for(self.request.name, self.request.prefix)
        if context.flush is None:  # outside a request (prefetch): the epoch of now
            request = self.request
            context.flush = flushepoch.mark(self.config.state_dir, request.prefix, request.name)
        self.epoch = context.flush.token
        start = time.perf_counter()
        entry = self._lookup()
        context.timings.add("hostcache", (time.perf_counter() - start) * 1000)
        if entry is not None and entry.age < ttl:
            return _hit(entry, context)
        if self._servable(entry):
            assert entry is not None
            return self._bounded(entry, ttl, context)
        return self._waiting(entry, ttl, context)

    def _lookup(self) -> Entry | None:
        """The entry, unless it was made under another flush epoch than this request's: one
        that a miss in flight when root flushed stored afterwards (kmskeys/flushepoch.py)."""
        entry = self.cache.lookup(self.desc)
        return entry if entry is not None and entry.epoch == self.epoch else None

    def _servable(self, entry: Entry | None) -> bool:
        grace = self.config.stale_grace
        return entry is not None and bool(grace) and entry.age <= grace

    def _waiting(self, entry: Entry | None, ttl: int, context: Context) -> Result:
        """No stale answer at hand: refresh here, up to the deadline."""
        try:
            # Refreshes of this entry by other keyrings' handlers wait here (up to
            # REFRESH_WAIT), then find it fresh.
            with self.cache.lock(self.config.state_dir, self.desc, REFRESH_WAIT):
                entry = self._lookup() or entry
                if entry is not None and entry.age < ttl:
                    return _hit(entry, context)
                done = self._task(context, ttl)()
        except DeadlineExceeded:
            # The handler refreshing it hung on the service past our deadline: unavailable.
            if not self._servable(entry):
                raise
            return self._stale(entry, context, "deadline exceeded")
        return self._answer(done, entry, context)

    def _bounded(self, standby: Entry, ttl: int, context: Context) -> Result:
        """A stale answer at hand: wait for the service at most stale_wait (module doc)."""
        config = self.config
        wait = max(0.0, min(config.stale_wait, context.deadline - time.monotonic()))
        until = time.monotonic() + wait
        try:
            with self.cache.lock(config.state_dir, self.desc, wait) as lock:
                fresh = self._lookup()
                if fresh is not None and fresh.age < ttl:
                    return _hit(fresh, context)
                if not lock.held:
                    why = f"another request is refreshing it (stale_wait {config.stale_wait:g} s)"
                    return self._stale(standby, context, why)
                done = self._in_background(lock, context, ttl, until)
        except DeadlineExceeded:
            # The handler's watchdog: whatever was started goes on in the background.
            return self._stale(standby, context, "deadline exceeded")
        if done is None:
            why = (
                f"{self.label} did not answer within stale_wait {config.stale_wait:g} s; "
                "refreshing in the background"
            )
            return self._stale(standby, context, why)
        return self._answer(done, standby, context)

    def _in_background(
        self, lock: RefreshLock, context: Context, ttl: int, until: float
    ) -> background.Finished | None:
        """Start the refresh apart, holding the lock and a background slot; its Finished if
        it ends by `until`, else None (it goes on)."""
        config = self.config
        charged = charged_uid(config, self.request.uid)
        slot = acquire_slot(
            config.state_dir, charged, background.BACKGROUND_PER_UID, BACKGROUND_PREFIX
        )
        if slot is None:
            why = (
                f"uid {charged} has {background.BACKGROUND_PER_UID} background refreshes "
                "running already"
            )
            return background.Finished(error=ServiceUnavailableError(why))
        task = self._late_logged(self._task(context, ttl), until, context.via)
        owned = (lock.hand_over(), slot)
        try:
            pending = background.runner().start(task, owned, context.deadline)
        except (OSError, RuntimeError) as exc:  # no process or thread to spare: retry later
            background.close(owned)
            why = f"cannot refresh in the background ({exc})"
            return background.Finished(error=ServiceUnavailableError(why))
        return pending.wait(until - time.monotonic())

    def _task(self, context: Context, ttl: int) -> background.Task:
        """The refresh itself: ask the service, keep the answer, or purge on a refusal."""
        cache, desc, config, uid = self.cache, self.desc, self.config, self.request.uid
        epoch = self.epoch

        def task() -> background.Finished:
            own = Context(context.deadline, context.budget)
            try:
                plaintext = self.refresh(own)
            except (RefusedError, UnknownSecretError) as exc:
                # A refusal is never masked: a revoked permission takes effect at this refresh;
                # nor is a secret the service says is gone (sm:, ssm:).
                cache.purge(desc)
                return background.Finished(error=exc, phases=own.timings.phases)
            except DeadlineExceeded:
                why = f"deadline exceeded before {self.label} answered"
                error: ResolverError = ServiceUnavailableError(why)
                return background.Finished(error=error, phases=own.timings.phases)
            except Exception as exc:
                return background.Finished(error=failure(exc), phases=own.timings.phases)
            # Kept for stale answers past its freshness; the kernel drops it after that.
            # Under this request's epoch: after a flush, no later request trusts it.
            lifetime = max(ttl, config.stale_grace) + 1
            kept = cache.store(desc, plaintext, lifetime, uid=uid, epoch=epoch)
            return background.Finished(plaintext, None, own.timings.phases, kept.reason)

        return task

    def _late_logged(self, task: background.Task, until: float, via: str | None) -> background.Task:
        """`task`, which logs its own line when it ends after the request was answered."""

        def logged() -> background.Finished:
            started = time.monotonic()
            done = task()
            if time.monotonic() > until:
                self._log_late(done, started, via)
            return done

        return logged

    def _log_late(self, done: background.Finished, started: float, via: str | None) -> None:
        from resolver.answer import log_writer
        from resolver.log import LOG_INFO, LOG_WARNING, format_fields

        request, error = self.request, done.error
        line = format_fields(
            uid=request.uid,
            user=request.user,
            name=request.name,
            outcome="ok" if error is None else error.outcome,
            source="background",
            reason=None if error is None else error.reason,
            cache=done.note or None,
            ms=f"{(time.monotonic() - started) * 1000:.0f}",
            via=via,
        )
        log_writer(self.config).emit(LOG_INFO if error is None else LOG_WARNING, line)

    def _answer(self, done: background.Finished, entry: Entry | None, context: Context) -> Result:
        for phase, ms in done.phases.items():
            context.timings.add(phase, ms)
        if done.note:
            context.notes["cache"] = done.note
        error = done.error
        if error is None:
            return Result(done.payload, details=context.notes)
        if isinstance(error, ServiceUnavailableError) and self._servable(entry):
            # The service is unavailable (never a refusal, never a uid over its own call rate).
            return self._stale(entry, context, error.reason)
        raise error

    def _stale(self, entry: Entry | None, context: Context, why: str) -> Result:
        """An answer from `entry` while the service is unavailable, if it is within
        stale_grace: with stale_ttl as the key's timeout, so that it is asked again soon."""
        if entry is None or not self._servable(entry):
            raise ServiceUnavailableError(why)
        context.notes.update(source="hostcache", age=f"{entry.age:.0f}", reason=why)
        return Result(entry.plaintext, ttl=self.config.stale_ttl, stale=True, details=context.notes)


def _hit(entry: Entry, context: Context) -> Result:
    context.notes.update(source="hostcache", age=f"{entry.age:.0f}")
    return Result(entry.plaintext, details=context.notes)
