"""KMS decryption in this process: one Decrypt bound to the request, through botocore alone.

botocore, not boto3: boto3 adds import time and resource models the resolver never uses. Every
setting comes from the resolver's config, none from the environment or ~/.aws.
"""

from __future__ import annotations

import os
import random
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kmskeys.blob import MODE_ENVELOPE, Blob, BlobFormatError
from kmskeys.contract import (
    AWS_EXPIRED_CREDENTIALS,
    AWS_THROTTLED,
    AWS_TRANSIENT,
    classify_aws_error,
)
from kmskeys.envelope import EnvelopeError, open_sealed
from kmskeys.trust import unsafe_reason
from resolver.backend import Request, Timings
from resolver.config import Config
from resolver.errors import (
    ConfigError,
    KmsUnavailableError,
    RefusedError,
    ResolverError,
    UnavailableError,
)
from resolver.limits import take_token
from resolver.policy import check_key

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

CONNECT_TIMEOUT_MAX = 1.0
MIN_ATTEMPT_SECONDS = 0.2
MAX_ATTEMPTS = 4
BACKOFF_BASE = 0.05


class KmsDecrypter:
    """Decrypts blobs with AWS KMS (or an endpoint that speaks its API)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def decrypt(self, blob: Blob, request: Request, deadline: float, timings: Timings) -> bytes:
        """Decrypt `blob` for `request`; raise a classified ResolverError otherwise."""
        try:
            context = blob.encryption_context(request.name, request.user)
        except BlobFormatError as exc:
            raise RefusedError(exc.reason) from None
        # Refused before any client exists: only configured keys, only configured regions.
        key_id, region = check_key(self.config, blob)
        self._spend(request)  # a uid over its KMS rate never builds a client
        plan, no_fallback = region_plan(self.config, key_id, region)
        for index, (attempt_key, attempt_region) in enumerate(plan):
            # Each region gets an equal share of what is left, the last one all of it: a hung
            # first region must leave the next one time to answer.
            left = deadline - time.monotonic()
            share = deadline if index + 1 == len(plan) else time.monotonic() + left / 2
            try:
                plaintext = self._decrypt_in(
                    attempt_key,
                    attempt_region,
                    blob,
                    context=context,
                    request=request,
                    deadline=share,
                    timings=timings,
                    phase="decrypt" if index == 0 else f"decrypt.{attempt_region}",
                )
                break
            except KmsUnavailableError as exc:
                if index + 1 == len(plan):
                    if no_fallback:
                        exc.reason += f"; {no_fallback}"
                    raise
                timings.add(f"failed.{attempt_region}", 0.0)
                self._spend(request)  # the next region's call is a KMS call too
        if blob.mode != MODE_ENVELOPE:
            return plaintext
        start = time.perf_counter()
        try:
            return open_sealed(blob, context, plaintext)
        except EnvelopeError as exc:
            raise RefusedError(str(exc)) from None
        finally:
            timings.add("open", (time.perf_counter() - start) * 1000)

    def _decrypt_in(
        self,
        key_id: str,
        region: str,
        blob: Blob,
        *,
        context: dict[str, str],
        request: Request,
        deadline: float,
        timings: Timings,
        phase: str,
    ) -> bytes:
        """One region's Decrypt (with retries) of the blob's ciphertext under `key_id`."""
        client = self._client(region, deadline, timings)
        # KeyId pins the key: KMS refuses a ciphertext that a different key produced.
        kwargs: dict[str, Any] = {"CiphertextBlob": blob.ciphertext, "KeyId": key_id}
        if context:
            kwargs["EncryptionContext"] = context
        start = time.perf_counter()
        try:
            response = _decrypt_with_retries(client, kwargs, deadline, lambda: self._spend(request))
        finally:
            timings.add(phase, (time.perf_counter() - start) * 1000)
        answered_key, plaintext = _checked_answer(response)
        if answered_key != key_id:
            raise RefusedError("KMS answered with a different KeyId than the blob names")
        return plaintext

    def _spend(self, request: Request) -> None:
        """Take a token from the requester's KMS-call bucket, or refuse for now (EAGAIN)."""
        config = self.config
        if not take_token(
            config.state_dir, request.uid, config.kms_rate_per_uid, config.kms_burst_per_uid
        ):
            raise UnavailableError(
                f"uid {request.uid} is over its KMS call rate (kms_rate_per_uid "
                f"{config.kms_rate_per_uid:g}/s, burst {config.kms_burst_per_uid})"
            )

    def _client(self, region: str, deadline: float, timings: Timings) -> KMSClient:
        start = time.perf_counter()
        from botocore.config import Config as BotoConfig
        from botocore.session import Session

        timings.add("import", (time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        session = Session()
        # Never ~/.aws/config: the resolver's settings come from its own file only.
        session.set_config_variable("config_file", os.devnull)
        creds = self.config.shared_credentials_file
        if creds is not None:
            _check_credentials_file(creds)
        session.set_config_variable("credentials_file", os.fspath(creds) if creds else os.devnull)
        if self.config.profile:
            session.set_config_variable("profile", self.config.profile)
        remaining = deadline - time.monotonic()
        connect = max(0.1, min(CONNECT_TIMEOUT_MAX, remaining / 4))
        # A slow answer may use all the time that is left: the watchdog fires first, the read
        # timeout is only its backstop. Retries are ours (_decrypt_with_retries), sized to the
        # deadline.
        read = max(MIN_ATTEMPT_SECONDS, remaining)
        # Credentials from the instance role come from IMDS: bound that fetch as well.
        session.set_config_variable("metadata_service_timeout", max(0.1, min(1.0, remaining / 4)))
        session.set_config_variable("metadata_service_num_attempts", 1)
        client: KMSClient = session.create_client(  # type: ignore[assignment]
            "kms",
            region_name=region,
            endpoint_url=self.config.endpoint_url,
            config=BotoConfig(
                connect_timeout=connect,
                read_timeout=read,
                retries={"total_max_attempts": 1, "mode": "standard"},
                user_agent_extra="kmskeys-resolver",
            ),
        )
        timings.add("client", (time.perf_counter() - start) * 1000)
        return client


def is_multi_region(key_arn: str) -> bool:
    """True for a multi-Region key (key id `mrk-...`): its replicas share its key material."""
    return key_arn.rpartition("/")[2].startswith("mrk-")


def in_region(key_arn: str, region: str) -> str:
    """The ARN of a multi-Region key's replica in `region` (same partition, account and id)."""
    parts = key_arn.split(":")
    parts[3] = region
    return ":".join(parts)


def region_plan(config: Config, key_arn: str, region: str) -> tuple[list[tuple[str, str]], str]:
    """The (KeyId, region) pairs to try in order, and why there is no fallback ("" if there is).

    The blob's own region first, then the other configured regions, only for a multi-Region
    key: a single-Region key exists in one region, and only configured regions are ever used.
    """
    others = [r for r in config.regions if r != region]
    if not others:
        return [(key_arn, region)], ""
    if not is_multi_region(key_arn):
        # Short: the log line keeps 160 characters of a reason.
        return [(key_arn, region)], "no region fallback: a single-Region key (not mrk-)"
    return [(key_arn, region)] + [(in_region(key_arn, r), r) for r in others], ""


def _decrypt_with_retries(
    client: KMSClient, kwargs: dict[str, Any], deadline: float, spend: Callable[[], None]
) -> dict[str, Any]:
    """Call Decrypt, retrying transient failures with jittered backoff while the deadline allows.

    botocore's own backoff (up to 1 s, then 2 s, ...) ignores the deadline: a throttled first
    attempt would use up a short deadline. Ours starts at 50 ms and never sleeps past the point
    where an attempt still has MIN_ATTEMPT_SECONDS left.
    """
    for attempt in range(MAX_ATTEMPTS):
        try:
            return dict(client.decrypt(**kwargs))
        except Exception as exc:
            error = classify(exc)
        delay = random.uniform(0.5, 1.0) * BACKOFF_BASE * 2**attempt  # noqa: S311 (jitter only)
        left = deadline - time.monotonic() - delay
        if not error.retryable or attempt + 1 == MAX_ATTEMPTS or left < MIN_ATTEMPT_SECONDS:
            if attempt:
                error.reason += f" after {attempt + 1} attempts"
            raise error
        time.sleep(delay)
        spend()  # every retry is a KMS call too
    raise AssertionError("unreachable")  # pragma: no cover


def _checked_answer(response: dict[str, Any]) -> tuple[str, bytes]:
    """KeyId and Plaintext of a Decrypt answer; a malformed answer is a transient failure."""
    # botocore turns an unparseable 200 body into an empty dict and lenient base64 into b"":
    # neither may become a key. KMS never returns an empty plaintext.
    key_id = response.get("KeyId")
    plaintext = response.get("Plaintext")
    if not isinstance(key_id, str) or not isinstance(plaintext, bytes) or not plaintext:
        raise KmsUnavailableError("KMS answered with a malformed Decrypt response")
    return key_id, plaintext


def _check_credentials_file(path: os.PathLike[str]) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"shared_credentials_file {os.fspath(path)}: {exc.strerror}") from None
    reason = unsafe_reason(st)
    if not reason and st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        reason = f"readable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if reason:
        raise ConfigError(f"shared_credentials_file {os.fspath(path)} is unsafe: {reason}")


def classify(exc: BaseException) -> ResolverError:
    """Map a botocore failure to a resolver failure class; the reason never holds a payload."""
    from botocore import exceptions as bx

    if isinstance(exc, ResolverError):
        return exc
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        kind = classify_aws_error(code, status)
        if kind in (AWS_THROTTLED, AWS_TRANSIENT, AWS_EXPIRED_CREDENTIALS):
            return KmsUnavailableError(f"KMS {code} (HTTP {status})", retryable=True)
        if not code or code.isdigit():
            # botocore names the error after the status when the body is unreadable: we do not
            # know what KMS said, so this is no refusal to cache.
            return KmsUnavailableError(f"KMS answered HTTP {status} with an unreadable error body")
        return RefusedError(f"KMS {code}")
    if isinstance(exc, bx.NoCredentialsError | bx.CredentialRetrievalError):
        return KmsUnavailableError(f"no AWS credentials ({type(exc).__name__})")
    if isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return KmsUnavailableError(f"KMS timed out ({type(exc).__name__})")
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionClosedError | bx.HTTPClientError):
        return KmsUnavailableError(f"KMS unreachable ({type(exc).__name__})", retryable=True)
    if isinstance(exc, bx.ProfileNotFound | bx.PartialCredentialsError):
        return ConfigError(f"credentials misconfigured ({type(exc).__name__})")
    if isinstance(exc, bx.ParamValidationError):
        return RefusedError("blob does not make a valid KMS request")
    if isinstance(exc, bx.BotoCoreError):
        return KmsUnavailableError(f"KMS call failed ({type(exc).__name__})")
    # botocore's parsers raise plain ValueError, TypeError, AttributeError... on a garbled body.
    return KmsUnavailableError(f"KMS answered with a malformed response ({type(exc).__name__})")


def kms_client(config: Config, region: str, deadline: float, timings: Timings) -> KMSClient:
    """A botocore KMS client built from `config` alone, sized to `deadline` (also the keystore
    seal's client: one construction for every KMS call the resolver makes)."""
    return KmsDecrypter(config)._client(region, deadline, timings)
