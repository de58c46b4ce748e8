"""The one gateway to AWS: every call the resolver makes goes through `Gateway.call`.

An Operation says what to call (service, method, parameters), which resource it names and how
to check the answer. The gateway applies each of these once, for every operation alike (KMS
Decrypt of a blob, the keystore seal's Encrypt and Decrypt, prefetch, Secrets Manager's
GetSecretValue, Parameter Store's GetParameter), in this order:

1. the operation's allowlist (`authorize`): the resource must be one the config lists, checked
   before any client exists, so a cheap refusal never loads botocore;
2. the caller's budget: one token per call, retries and fallback regions included (the
   requester's uid bucket, prefetch's own, or none for root's admin commands);
3. region planning: the resource's region, then its replicas in the other configured regions;
4. retries with jittered backoff that never sleeps past the point where an attempt would have
   less than MIN_ATTEMPT_SECONDS left (botocore's own backoff ignores the deadline);
5. the one error classification (kmskeys.contract.classify_aws_exception) mapped to the
   resolver's failure classes; the reason names AWS error codes, never AWS's messages.

An operation is a class with the Operation attributes and methods; its `authorize` is its own
allowlist check, and an optional `refusal(code)` names what an AWS refusal code means for it
(resolver/secretsmanager.py, resolver/parameterstore.py: a missing secret is unknown, ENOKEY).
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from kmskeys.contract import (
    AWS_ACCESS_DENIED,
    AWS_BAD_CREDENTIALS,
    AWS_CREDENTIALS_CONFIG,
    AWS_EXPIRED_CREDENTIALS,
    AWS_INVALID_CIPHERTEXT,
    AWS_INVALID_REQUEST,
    AWS_KEY_STATE,
    AWS_MALFORMED,
    AWS_NO_CREDENTIALS,
    AWS_REFUSED,
    AWS_THROTTLED,
    AWS_TIMEOUT,
    AWS_TRANSIENT,
    AWS_UNREACHABLE,
    AWS_UNREADABLE,
    classify_aws_exception,
)
from resolver.awsclient import MIN_ATTEMPT_SECONDS, Clients, SessionClients
from resolver.backend import Budget, Timings
from resolver.errors import (
    ConfigError,
    RefusedError,
    ResolverError,
    ServiceUnavailableError,
)

if TYPE_CHECKING:
    from resolver.config import Config

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
MAX_ATTEMPTS = 4
BACKOFF_BASE = 0.05
# AWS answered, and the answer is no: the caller may not, the key will not, the input is not it.
REFUSALS = frozenset(
    (AWS_BAD_CREDENTIALS, AWS_ACCESS_DENIED, AWS_KEY_STATE, AWS_INVALID_CIPHERTEXT, AWS_REFUSED)
)


class Target:
    """The resource one call names (a key or secret ARN) and the region it is called in."""

    __slots__ = ("region", "resource")

    def __init__(self, resource: str, region: str) -> None:
        self.resource = resource
        self.region = region

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Target) and (other.resource, other.region) == (
            self.resource,
            self.region,
        )

    def __hash__(self) -> int:
        return hash((self.resource, self.region))

    def __repr__(self) -> str:
        return f"Target({self.resource!r}, {self.region!r})"


class Operation(Protocol[T_co]):
    """One kind of AWS call. `service` is botocore's name for it ("kms"), `label` how reasons
    name it ("KMS"), `method` the client method ("decrypt"), `phase` its timings' name."""

    service: str
    label: str
    method: str
    phase: str

    def authorize(self, config: Config) -> Target:
        """The resource and region the call may use, or RefusedError/ConfigError: the
        allowlist, applied before any client exists."""
        ...

    def plan(self, config: Config, target: Target) -> tuple[list[Target], str]:
        """The targets to try in order, and why there is no fallback ("" when there is)."""
        ...

    def params(self, target: Target) -> dict[str, Any]:
        """The call's parameters for `target`."""
        ...

    def answer(self, target: Target, response: dict[str, Any]) -> T_co:
        """The checked result of a response: RefusedError when it names another resource,
        ServiceUnavailableError when it is malformed."""
        ...

    def invalid_request(self) -> str:
        """The reason when botocore refuses to send the parameters."""
        ...


class Authorized(Generic[T_co]):
    """An operation whose allowlist check has passed, with the target it passed for."""

    __slots__ = ("operation", "target")

    def __init__(self, operation: Operation[T_co], target: Target) -> None:
        self.operation = operation
        self.target = target


class Gateway:
    """Applies the allowlist, the budget, region planning, retries and the classification."""

    def __init__(self, config: Config, clients: Clients | None = None) -> None:
        self.config = config
        self.clients = clients if clients is not None else SessionClients(config)

    def authorize(self, operation: Operation[T]) -> Authorized[T]:
        """The allowlist, once per request: call it before any cache or daemon is asked."""
        return Authorized(operation, operation.authorize(self.config))

    def call(
        self, authorized: Authorized[T], budget: Budget, deadline: float, timings: Timings
    ) -> T:
        """Make the call within `deadline`, spending `budget`; a classified ResolverError."""
        op = authorized.operation
        budget.spend()  # a caller over its rate never builds a client
        plan, no_fallback = op.plan(self.config, authorized.target)
        for index, target in enumerate(plan):
            # Each region gets an equal share of what is left, the last one all of it: a hung
            # first region must leave the next one time to answer.
            last = index + 1 == len(plan)
            share = deadline if last else time.monotonic() + (deadline - time.monotonic()) / 2
            phase = op.phase if index == 0 else f"{op.phase}.{target.region}"
            try:
                return self._attempts(
                    op, target=target, budget=budget, deadline=share, timings=timings, phase=phase
                )
            except ServiceUnavailableError as exc:
                if last:
                    if no_fallback:
                        exc.reason += f"; {no_fallback}"
                    raise
                timings.add(f"failed.{target.region}", 0.0)
                budget.spend()  # the next region's call is a call too
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempts(
        self,
        op: Operation[T],
        *,
        target: Target,
        budget: Budget,
        deadline: float,
        timings: Timings,
        phase: str,
    ) -> T:
        """One target's call, retrying what is worth it while the deadline allows."""
        client = self.clients.client(op.service, target.region, deadline, timings)
        method = getattr(client, op.method)
        params = op.params(target)
        start = time.perf_counter()
        try:
            for attempt in range(MAX_ATTEMPTS):
                try:
                    response = dict(method(**params))
                except Exception as exc:
                    error = failure(exc, op)
                else:
                    return op.answer(target, response)
                delay = random.uniform(0.5, 1.0) * BACKOFF_BASE * 2**attempt  # noqa: S311
                left = deadline - time.monotonic() - delay
                if not error.retryable or attempt + 1 == MAX_ATTEMPTS or left < MIN_ATTEMPT_SECONDS:
                    if attempt:
                        error.reason += f" after {attempt + 1} attempts"
                    raise error
                time.sleep(delay)
                budget.spend()  # every retry is a call too
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            timings.add(phase, (time.perf_counter() - start) * 1000)


def failure(exc: BaseException, op: Operation[Any]) -> ResolverError:
    """The resolver's class for a failed call of `op`; the reason never holds a payload."""
    if isinstance(exc, ResolverError):
        return exc
    found = classify_aws_exception(exc)
    label, code, status = op.label, found.code, found.status
    if found.kind in (AWS_THROTTLED, AWS_TRANSIENT, AWS_EXPIRED_CREDENTIALS):
        return ServiceUnavailableError(f"{label} {code} (HTTP {status})", retryable=True)
    if found.kind == AWS_UNREADABLE:
        # We do not know what AWS said: no refusal to cache.
        return ServiceUnavailableError(
            f"{label} answered HTTP {status} with an unreadable error body"
        )
    if found.kind in REFUSALS:
        # An operation may name what a code means for it (Secrets Manager's
        # ResourceNotFoundException is an unknown secret, not a refusal): `refusal(code)`.
        refine = getattr(op, "refusal", None)
        special = refine(code) if refine is not None else None
        return special if isinstance(special, ResolverError) else RefusedError(f"{label} {code}")
    if found.kind == AWS_NO_CREDENTIALS:
        return ServiceUnavailableError(f"no AWS credentials ({code})")
    if found.kind == AWS_TIMEOUT:
        return ServiceUnavailableError(f"{label} timed out ({code})")
    if found.kind == AWS_UNREACHABLE:
        return ServiceUnavailableError(f"{label} unreachable ({code})", retryable=True)
    if found.kind == AWS_CREDENTIALS_CONFIG:
        return ConfigError(f"credentials misconfigured ({code})")
    if found.kind == AWS_INVALID_REQUEST:
        return RefusedError(op.invalid_request())
    if found.kind == AWS_MALFORMED:
        # botocore's parsers raise plain ValueError, TypeError... on a garbled body.
        return ServiceUnavailableError(f"{label} answered with a malformed response ({code})")
    return ServiceUnavailableError(f"{label} call failed ({code})")


class Unmetered:
    """The budget of root's own admin commands (`stored rotate`): no bucket."""

    def spend(self) -> None:
        """Always a token."""


UNMETERED = Unmetered()
