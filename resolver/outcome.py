"""What a request comes to, decided before the kernel is answered: an Outcome.

The pipeline (resolver/pipeline.py) turns a request into an Outcome without touching the key;
the answer path (resolver/answer.py) carries it out and writes its one log line. An Outcome is
plain data (numbers, strings, the payload), so a daemon can decide it in process and hand it to
a small C program that answers the key (issue 23): for an answer, chown to (`uid`, `gid`),
setperm `perm`, set the timeout `timeout` and instantiate `payload`; for a failure, chown and
setperm the same way (a refusal's mask, kmskeys.contract.NEGATIVE_KEY_PERM), reject with `errno`
and `timeout`; then send `line(ms)` at `severity`. Between the mask and the instantiation or
rejection, `flush.changed()` must be false, or the request is resolved again (a flush came).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmskeys.contract import ADMIN_KEY_PERM, ADMIN_NEGATIVE_KEY_PERM, NEGATIVE_KEY_PERM
from resolver.errors import ResolverError, errno_name
from resolver.log import LOG_ERR, LOG_WARNING, format_fields

if TYPE_CHECKING:
    from kmskeys.flushepoch import Mark

_ADMIN_PERMS = (ADMIN_KEY_PERM, ADMIN_NEGATIVE_KEY_PERM)


class Outcome:
    """One request's decision: an answer (`errno` 0) or a rejection, and its log line.

    `outcome` is ok, stale, unknown, refused, unavailable, quota or error; `severity` is its
    line's (LOG_INFO, LOG_WARNING, LOG_ERR); `key` the key's serial (%k); `uid` the requester
    (%u), the key's owner; `timeout` the key's ttl, or the rejection's negative_ttl;
    `negative_ttl` what a rejection gets should the answer fail after all; `gid` the key's
    group (the admin group, or %g); `perm` its mask; `errno` what it is rejected with (0 for
    an answer); `name` NAME, or the description when it did not parse; `details` plain facts
    (source, mode, age); `flush` the request's flush epoch when it started
    (kmskeys/flushepoch.py: an answer re-checks it before the key is instantiated or rejected).
    Not a dataclass: the handler imports this on every miss.
    """

    __slots__ = _FIELDS = (
        "outcome",
        "severity",
        "key",
        "uid",
        "timeout",
        "negative_ttl",
        "payload",
        "gid",
        "perm",
        "errno",
        "name",
        "user",
        "details",
        "reason",
        "timings",
        "flush",
    )

    def __init__(
        self,
        outcome: str,
        severity: int,
        *,
        key: int,
        uid: int,
        timeout: int,
        negative_ttl: int,
        payload: bytes = b"",
        gid: int = -1,
        perm: int = 0,
        errno: int = 0,
        name: str = "",
        user: str | None = None,
        details: tuple[tuple[str, str], ...] = (),
        reason: str | None = None,
        timings: str = "",
        flush: Mark | None = None,
    ) -> None:
        self.outcome, self.severity, self.key, self.uid = outcome, severity, key, uid
        self.timeout, self.negative_ttl, self.payload = timeout, negative_ttl, payload
        self.gid, self.perm, self.errno, self.name, self.user = gid, perm, errno, name, user
        self.details, self.reason, self.timings = details, reason, timings
        self.flush = flush

    def replace(self, **changes: Any) -> Outcome:
        """A copy with `changes`."""
        values = {name: getattr(self, name) for name in self._FIELDS}
        values.update(changes)
        return Outcome(**values)

    def __repr__(self) -> str:  # never the payload
        return f"Outcome({self.outcome}, key={self.key}, uid={self.uid}, errno={self.errno})"

    @property
    def answered(self) -> bool:
        """True when the key is to be instantiated, False when it is to be rejected."""
        return self.errno == 0 and self.outcome in ("ok", "stale")

    @property
    def negative_perm(self) -> int:
        """The mask of this request's key should it be rejected (a refusal's, or an answer's the
        kernel refused): the owner bits, no possessor bits, and with the admin group SETATTR too
        (kmskeys/contract.py NEGATIVE_KEY_PERM)."""
        return ADMIN_NEGATIVE_KEY_PERM if self.perm in _ADMIN_PERMS else NEGATIVE_KEY_PERM

    def rejected(self, error: ResolverError, *, severity: int | None = None) -> Outcome:
        """This request, rejected with `error` after all (the answer failed, say)."""
        return self.replace(
            outcome=error.outcome,
            severity=severity if severity is not None else LOG_ERR if error.alarm else LOG_WARNING,
            timeout=self.negative_ttl,
            payload=b"",
            perm=self.negative_perm,
            errno=error.answer_errno,
            reason=error.reason,
        )

    def line(self, ms: float | None = None) -> str:
        """The one log line: never a payload; requester-given values quoted (resolver/log.py).

        A program-bound request's line also names what was seen of the requester: the
        `requester` detail, fields already rendered by resolver.task.Requester.summary.
        """
        facts = dict(self.details)
        line = format_fields(
            uid=self.uid,
            user=self.user,
            name=self.name,
            key=self.key,
            outcome=self.outcome,
            source=facts.get("source"),
            mode=facts.get("mode"),
            age=facts.get("age"),
            # What an sm:/ssm: answer was: the version the service returned (VersionId, a
            # parameter version), the stage or label asked for, the JSON field served.
            version=facts.get("version"),
            stage=facts.get("stage"),
            label=facts.get("label"),
            field=facts.get("field"),
            ttl=self.timeout if self.answered else None,
            # Why the host cache did not keep this answer (a uid at its charge, say).
            cache=facts.get("cache"),
            errno=None if self.answered else errno_name(self.errno),
            reason=self.reason,
        )
        seen = facts.get("requester")
        timed = format_fields(ms=None if ms is None else f"{ms:.0f}", t=self.timings or None)
        return " ".join(part for part in (line, seen, timed) if part)
