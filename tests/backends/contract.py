"""The contract every backend keeps (jaraco/keyring's `testing/backend.py`, for resolver backends).

A backend's tests subclass BackendContract and say how to make the backend and which requests
it knows: the tests below then hold it to the interface of resolver/backend.py, directly and
through the pipeline and the answer path (resolver/pipeline.py, resolver/answer.py) against an
in-memory stand-in of the kernel's key calls. The stand-in is honest about what it models: the
answer calls' order and the `user` type's payload bounds; everything a real kernel decides
beyond that (possession, quotas, the upcall) is the real-upcall tiers' (tests/upcall,
tests/stored), which stay.

A subclass provides:
- `backend(config)`: the backend under test for `config`;
- `config`: a pytest fixture giving a Config the backend serves;
- `known(config)`: a Request it answers, and `expected` (its payload, or None when random);
- `unknown(config)`: a Request for a name it does not know (None when every name exists);
- `refused(config)`: a Request it must refuse (bad callout, qualifier or blob);
- `aws_calls()`: how many AWS calls it has made so far (None when it makes none).
"""

from __future__ import annotations

import errno
import time
from contextlib import suppress
from pathlib import Path
from typing import ClassVar

import pytest

from kmskeys.contract import (
    ADMIN_KEY_PERM,
    ADMIN_NEGATIVE_KEY_PERM,
    NEGATIVE_KEY_PERM,
    RESOLVED_KEY_PERM,
    USER_PAYLOAD_MAX,
)
from kmskeys.errors import InvalidArgumentError, KeyRevokedError
from resolver.answer import answer
from resolver.backend import Backend, Context, Request, Result
from resolver.config import Config
from resolver.errors import RefusedError, UnavailableError, UnknownSecretError
from resolver.hostcache import Entry, Kept, RefreshLock
from resolver.pipeline import KernelRequest, resolve

ANSWER_ERRNOS = (errno.ENOKEY, errno.EKEYREJECTED, errno.EAGAIN, errno.EDQUOT)
POSSESSOR_BITS = 0x3F000000


class MemoryKey:
    """A key under construction as the answer path sees it: one answer, after its set-up."""

    def __init__(self, serial: int = 4242) -> None:
        self.serial = serial
        self.calls: list[str] = []
        self.owner: tuple[int, int] | None = None
        self.perm: int | None = None
        self.timeout: int | None = None
        self.payload: bytes | None = None
        self.rejected: tuple[int, int] | None = None

    def _settle(self, call: str) -> None:
        if self.payload is not None or self.rejected is not None:
            raise KeyRevokedError(f"{call}: key already answered", errno=errno.EKEYREVOKED)
        self.calls.append(call)

    def assume_authority(self) -> None:
        self._settle("assume_authority")

    def chown(self, uid: int, gid: int = -1) -> None:
        self._settle("chown")
        self.owner = (uid, gid)

    def setperm(self, perm: int) -> None:
        self._settle("setperm")
        self.perm = perm

    def set_timeout(self, seconds: int) -> None:
        self._settle("set_timeout")
        self.timeout = seconds

    def instantiate(self, payload: str | bytes, keyring: int = 0) -> None:
        self._settle("instantiate")
        data = payload.encode() if isinstance(payload, str) else payload
        # security/keys/user_defined.c: datalen <= 0 || datalen > 32767 is EINVAL.
        if not 0 < len(data) <= USER_PAYLOAD_MAX:
            raise InvalidArgumentError("instantiate: bad payload size", errno=errno.EINVAL)
        self.payload = data

    def reject(self, timeout: int, error: int, keyring: int = 0) -> None:
        self._settle("reject")
        self.rejected = (timeout, error)


class RecordingLog:
    """A log writer that keeps its lines."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def emit(self, severity: int, message: str) -> None:
        self.lines.append((severity, message))


class MemoryBudget:
    """A token bucket that never refills."""

    def __init__(self, tokens: int = 1000) -> None:
        self.tokens = tokens
        self.spent = 0

    def spend(self) -> None:
        if self.tokens <= 0:
            raise UnavailableError("test budget is empty")
        self.tokens -= 1
        self.spent += 1


class MemoryCache:
    """The host cache, in a dict (the real one is root's persistent keyring)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, bytes, bytes]] = {}

    def lookup(self, desc: str) -> Entry | None:
        found = self.entries.get(desc)
        if found is None:
            return None
        return Entry(0, found[1], time.monotonic() - found[0], found[2])

    def store(
        self, desc: str, plaintext: bytes, lifetime: int, *, uid: int, epoch: bytes = bytes(8)
    ) -> Kept:
        self.entries[desc] = (time.monotonic(), plaintext, epoch)
        return Kept(True)

    def purge(self, desc: str) -> None:
        self.entries.pop(desc, None)

    def lock(self, state_dir: Path, desc: str, wait: float) -> RefreshLock:
        return RefreshLock(-1, True)


def kernel_request(request: Request, key: int = 4242) -> KernelRequest:
    """The kernel's view of a backend request."""
    desc = f"{request.prefix}:{request.name}{request.qualifier}"
    return KernelRequest(key, desc, request.uid, request.gid, callout=request.callout)


class BackendContract:
    """What every backend must do; see the module docstring for what a subclass provides."""

    expected: ClassVar[bytes | None] = None

    def backend(self, config: Config) -> Backend:
        raise NotImplementedError

    def known(self, config: Config) -> Request:
        raise NotImplementedError

    def unknown(self, config: Config) -> Request | None:
        raise NotImplementedError

    def refused(self, config: Config) -> Request:
        raise NotImplementedError

    def aws_calls(self) -> int | None:
        return None

    def context(self, budget: MemoryBudget | None = None) -> Context:
        return Context(time.monotonic() + 5.0, budget or MemoryBudget())

    # --- the interface -------------------------------------------------------------------

    def test_a_known_request_resolves_to_a_result(self, config: Config) -> None:
        result = self.backend(config).resolve(self.known(config), self.context())
        assert isinstance(result, Result)
        assert 0 < len(result.payload) <= USER_PAYLOAD_MAX
        if self.expected is not None:
            assert result.payload == self.expected
        assert result.ttl is None or result.ttl >= 1

    def test_results_and_their_details_never_show_the_payload(self, config: Config) -> None:
        result = self.backend(config).resolve(self.known(config), self.context())
        shown = repr(result) + repr(dict(result.details))
        assert result.payload not in shown.encode()
        assert all(isinstance(v, str) for v in result.details.values())

    def test_an_unknown_name_is_unknown_secret(self, config: Config) -> None:
        request = self.unknown(config)
        if request is None:
            return  # every name exists for this backend (it makes them on first request)
        with pytest.raises(UnknownSecretError):
            self.backend(config).resolve(request, self.context())

    def test_a_bad_request_is_a_refusal_and_nothing_else(self, config: Config) -> None:
        with pytest.raises(RefusedError):
            self.backend(config).resolve(self.refused(config), self.context())

    def test_an_empty_budget_makes_no_aws_call(self, config: Config) -> None:
        before = self.aws_calls()
        with suppress(UnavailableError):
            self.backend(config).resolve(self.known(config), self.context(MemoryBudget(0)))
        if before is not None:
            assert self.aws_calls() == before

    # --- through the pipeline and the answer path ---------------------------------------

    def _answered(self, config: Config, request: Request) -> tuple[MemoryKey, RecordingLog]:
        asked = kernel_request(request)
        outcome = resolve(asked, config, time.monotonic() + 5.0, budget=MemoryBudget())
        key, log = MemoryKey(asked.key), RecordingLog()
        answer(key, outcome, log, time.monotonic())
        return key, log

    def test_the_kernel_gets_one_owner_only_answer_and_one_line(self, config: Config) -> None:
        request = self.known(config)
        key, log = self._answered(config, request)
        assert key.calls == ["chown", "setperm", "set_timeout", "instantiate"]
        assert key.owner is not None and key.owner[0] == request.uid
        assert key.perm in (RESOLVED_KEY_PERM, ADMIN_KEY_PERM)
        assert key.perm is not None and not key.perm & POSSESSOR_BITS
        assert key.timeout is not None and key.timeout >= 1
        assert key.payload is not None and (self.expected in (None, key.payload))
        assert len(log.lines) == 1
        assert " outcome=ok " in log.lines[0][1] and f" name={request.name} " in log.lines[0][1]
        assert key.payload.decode("latin-1") not in log.lines[0][1]

    def test_a_refusal_is_one_rejection_with_its_class_and_one_line(self, config: Config) -> None:
        request = self.refused(config)
        key, log = self._answered(config, request)
        # The refusal's mask first: no possessor bits, or a co-possessor's add_key of the name
        # would instantiate the cached refusal (kmskeys.contract.NEGATIVE_KEY_PERM).
        assert key.calls == ["chown", "setperm", "reject"] and key.payload is None
        assert key.perm in (NEGATIVE_KEY_PERM, ADMIN_NEGATIVE_KEY_PERM)
        assert key.owner is not None and key.owner[0] == request.uid
        assert key.rejected is not None
        assert key.rejected == (config.negative_ttl, errno.EKEYREJECTED)
        assert len(log.lines) == 1 and " outcome=refused " in log.lines[0][1]

    def test_every_failure_answers_with_one_of_the_errnos(self, config: Config) -> None:
        for request in (self.unknown(config), self.refused(config)):
            if request is None:
                continue
            key, _ = self._answered(config, request)
            assert key.rejected is not None and key.rejected[1] in ANSWER_ERRNOS
