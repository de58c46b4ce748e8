"""`sm:` and `ssm:` hostile input through the real upcall: each case its errno class, a clear
log line, no AWS call where none is needed, and nothing cached that should not be.

- EKEYREJECTED, cached for negative_ttl: a name outside the allowlist, a bad or non-canonical
  selector, policy; a secret that is not JSON when a field is asked, a value over 32767 bytes,
  a parameter of a type not served, access denied.
- ENOKEY, cached for negative_ttl: a field that is not there, a secret deleted or marked for
  deletion, a stage, parameter or version that does not exist.
- EAGAIN, never cached: throttled, 5xx; a host-cache entry up to stale_grace old answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from kmskeys import KeyNotFoundError, KeyRejectedError, Keyring, TemporarilyUnavailableError
from tests.support.kms_proxy import aws_error, only
from tests.support.names import unique
from tests.support.requester import NOBODY, as_user
from tests.support.ttl import MIN_TTL, gone_after
from tests.upcall.sources import Sources, ask

pytestmark = pytest.mark.upcall


def refused(sources: Sources, desc: str, name: str, error: type[Exception], reason: str) -> str:
    """Ask as root and as another uid: each gets `error`; the log line says `reason`."""
    with pytest.raises(error):
        ask(desc)
    line = sources.install.log.wait_for(name)
    assert reason in line, line
    other = as_user(NOBODY, lambda: ask(desc).decode())
    assert isinstance(other, dict) and other.get("error") == error.__name__, other
    sources.install.log.wait_for(name)
    return line


def test_a_name_outside_the_allowlist_is_refused_without_a_call(sources: Sources) -> None:
    sources.sm().create_secret(Name=f"app/{(name := unique('out'))}", SecretString="kmst-no")
    line = refused(sources, sources.sm_desc(name), name, KeyRejectedError, "not in sm_secrets")
    assert " outcome=refused " in line and " errno=EKEYREJECTED " in line, line
    assert "import:" not in line and "client:" not in line, line  # botocore never loaded
    sources.ssm().put_parameter(Name=f"/other/{name}", Value="kmst-no", Type="String")
    desc = sources.ssm_desc(f"other/{name}")
    refused(sources, desc, f"other/{name}", KeyRejectedError, "not in ssm_parameters")
    assert sources.proxy.count() == 0  # no AWS call of any kind


@pytest.mark.parametrize(
    ("selector", "reason"),
    [
        ("#stage=AWSCURRENT", "is spelled"),
        ("#stage=AWSPREVIOUS#password", "the field comes first"),
        ("#pass word", "must be"),
        ("#password\nsource=hostcache", "must be"),
        ("#version=x", "32 to 64"),
    ],
)
def test_a_bad_selector_is_refused_without_a_call(
    sources: Sources, selector: str, reason: str
) -> None:
    name = sources.secret({"password": "kmst-x"})
    line = refused(sources, sources.sm_desc(name + selector), name, KeyRejectedError, reason)
    assert "\n" not in line.rstrip("\n")  # a newline in a description never splits the line
    assert sources.calls() == 0


def test_what_the_secret_lacks_is_unknown_or_refused_and_logged(sources: Sources) -> None:
    name = sources.secret({"password": "kmst-pw"})
    refused(sources, sources.sm_desc(f"{name}#user"), name, KeyNotFoundError, "no field 'user'")
    stage = sources.sm_desc(f"{name}#stage=kmst-nolabel")
    refused(sources, stage, name, KeyNotFoundError, "no version kmst-nolabel")
    text = sources.secret("kmst-not-json")
    refused(sources, sources.sm_desc(f"{text}#password"), text, KeyRejectedError, "not JSON")
    big = sources.secret("x" * 32768)
    refused(sources, sources.sm_desc(big), big, KeyRejectedError, "a kernel key holds at most")
    # One call for the JSON secret and one for the text one, whichever uid and field: the host
    # cache keeps values. Not refusals: the missing stage is one call per uid (each uid's
    # kernel keeps its own refusal for negative_ttl), and so is the secret too large for a key.
    assert sources.calls() == 1 + 2 + 1 + 2


def test_deleted_and_scheduled_secrets_are_unknown(sources: Sources) -> None:
    gone, scheduled = sources.secret("kmst-gone"), sources.secret("kmst-scheduled")
    assert ask(sources.sm_desc(gone)) == b"kmst-gone"  # in the host cache now
    sources.sm().delete_secret(SecretId=f"app/{gone}", ForceDeleteWithoutRecovery=True)
    sources.sm().delete_secret(SecretId=f"app/{scheduled}", RecoveryWindowInDays=7)
    reason = "marked for deletion"
    refused(sources, sources.sm_desc(scheduled), scheduled, KeyNotFoundError, reason)
    # The cached copy of the deleted one ends at the flush its deletion event runs; the next
    # request asks the service, which says it is gone: never an answer from the old entry.
    with pytest.raises(KeyNotFoundError):
        sources.proxy.set_fault(None)
        Keyring.join_session()
        _flush(sources, gone)
        ask(sources.sm_desc(gone))
    assert "ResourceNotFoundException" in sources.install.log.drain()[-1]


def _flush(sources: Sources, name: str) -> None:
    import subprocess

    from tests.upcall.harness import KMSKEYS

    done = subprocess.run(
        [str(KMSKEYS), "flush", name, "--prefix", sources.sm_prefix],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_parameters_missing_or_of_another_type(sources: Sources) -> None:
    missing = f"kmst/{unique('ssm')}/none"
    refused(sources, sources.ssm_desc(missing), missing, KeyNotFoundError, "ParameterNotFound")
    name = sources.parameter("kmst-v1")
    refused(
        sources, sources.ssm_desc(f"{name}#7"), name, KeyNotFoundError, "ParameterVersionNotFound"
    )
    listed = sources.parameter("a,b", kind="StringList")
    reason = "type StringList is not in ssm_types"
    refused(sources, sources.ssm_desc(listed), listed, KeyRejectedError, reason)


def test_access_denied_is_a_refusal(sources: Sources) -> None:
    name = sources.secret("kmst-denied")
    sources.proxy.set_fault(only("secretsmanager", aws_error("AccessDeniedException")))
    refused(sources, sources.sm_desc(name), name, KeyRejectedError, "AccessDeniedException")


@pytest.mark.parametrize("service", ["secretsmanager", "ssm"])
def test_a_throttled_service_is_eagain_and_never_cached(sources: Sources, service: str) -> None:
    if service == "ssm":
        name = sources.parameter("kmst-throttled")
        desc = sources.ssm_desc(name)
    else:
        name = sources.secret("kmst-throttled")
        desc = sources.sm_desc(name)
    sources.proxy.set_fault(only(service, aws_error("ThrottlingException")))
    line = refused(sources, desc, name, TemporarilyUnavailableError, "ThrottlingException")
    assert " outcome=unavailable " in line and " errno=EAGAIN " in line, line
    # Not cached: the next request, once the service answers, upcalls and gets the value.
    sources.proxy.set_fault(None)
    assert ask(desc) == b"kmst-throttled"
    assert " outcome=ok " in sources.install.log.wait_for(name)


def test_the_host_cache_answers_stale_while_the_service_is_throttled(sources: Sources) -> None:
    name = sources.secret({"password": "kmst-stale"}, stem="smshort")  # ttl MIN_TTL
    desc = sources.sm_desc(f"{name}#password")
    assert ask(desc) == b"kmst-stale"
    sources.install.log.wait_for(name)
    time.sleep(gone_after(MIN_TTL))  # the key and the entry's freshness are both past
    before = sources.calls()
    sources.proxy.set_fault(only("secretsmanager", aws_error("ThrottlingException")))
    assert as_user(NOBODY, lambda: ask(desc).decode()) == {"ok": "kmst-stale"}
    line = sources.install.log.wait_for(name)
    assert " outcome=stale source=hostcache " in line, line
    # The gateway retries a throttled call with backoff; on a loaded machine the client's start
    # and four attempts outlast stale_wait, and the line says so instead (the refresh goes on).
    assert "ThrottlingException" in line or "did not answer within stale_wait" in line, line
    deadline = time.monotonic() + 10
    while sources.calls() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sources.calls() > before  # the service was asked, and throttled
    assert " version=" in line, line
    # A name the host never fetched has nothing to fall back on: EAGAIN.
    fresh = sources.secret("kmst-never")
    with pytest.raises(TemporarilyUnavailableError):
        ask(sources.sm_desc(fresh))


def test_a_refusal_drops_the_host_cache_entry(sources: Sources) -> None:
    name = sources.secret("kmst-revoked", stem="smshort")
    assert ask(sources.sm_desc(name)) == b"kmst-revoked"
    time.sleep(gone_after(MIN_TTL))
    sources.proxy.set_fault(only("secretsmanager", aws_error("AccessDeniedException")))
    Keyring.join_session()
    with pytest.raises(KeyRejectedError):
        ask(sources.sm_desc(name))
    # Throttled now: the entry the refusal dropped cannot answer stale any more.
    sources.proxy.set_fault(only("secretsmanager", aws_error("ThrottlingException")))
    time.sleep(gone_after(MIN_TTL))  # the cached refusal (negative_ttl) goes
    with pytest.raises(TemporarilyUnavailableError):
        ask(sources.sm_desc(name))


def test_policy_names_who_may_ask(sources: Sources) -> None:
    name = sources.secret("kmst-for-nobody", stem="smnobody")
    desc = sources.sm_desc(name)
    ok: Callable[[], object] = lambda: ask(desc).decode()  # noqa: E731
    assert as_user(NOBODY, ok) == {"ok": "kmst-for-nobody"}
    sources.install.log.wait_for(name)
    with pytest.raises(KeyRejectedError):
        ask(desc)  # root, with the entry fresh in the host cache
    assert "policy: sm 'kmst-*-smnobody*'" in sources.install.log.wait_for(name)
    assert sources.calls() == 1
