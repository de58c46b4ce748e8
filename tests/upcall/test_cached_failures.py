"""A cached failure names who put it there (issue 26.9), through the real request-key.

The resolver's refusal and the kernel's own negation after an upcall no resolver answered are
both negative keys that answer ENOKEY until they expire; the resolver's has no possessor bits,
the kernel's keeps its default mask. The client's message and doctor say which, and for the
kernel's, the cause this process can see: no rule, a program that cannot start, a host that
refuses upcalls of non-root requesters. Never "check the name" for a failure no resolver saw.
"""

from __future__ import annotations

import errno
import json
import subprocess

import pytest

from kmskeys import KeyNotFoundError, get_secret
from kmskeys.contract import NEGATIVE_KEY_PERM, POSSESSOR_MASK
from tests.support.names import unique
from tests.support.request_key_rule import request_key_rule
from tests.support.requester import NOBODY, as_user, capabilities
from tests.upcall.harness import KMSKEYS, Install

pytestmark = pytest.mark.upcall

NO_RESOLVER = "no resolver answered this request"
THE_NAME = "check the name, and that a blob is deployed"


def _failure(func: object) -> str:
    with pytest.raises(KeyNotFoundError) as caught:
        func()  # type: ignore[operator]
    assert caught.value.errno == errno.ENOKEY
    return str(caught.value)


def test_the_resolvers_refusal_is_named_as_its_answer(resolver: Install) -> None:
    name = unique("unknown")  # no blob deployed: the resolver answers ENOKEY
    first = _failure(lambda: get_secret(name, prefix=resolver.prefix))
    again = _failure(lambda: get_secret(name, prefix=resolver.prefix))
    for message in (first, again):
        assert "the resolver's answer" in message and NO_RESOLVER not in message, message
        assert THE_NAME in message  # here, the resolver's advice is the right one
    from kmskeys.cached import cached_failure

    negative = cached_failure(resolver.description(name))
    assert negative is not None and not negative.perm & POSSESSOR_MASK
    assert negative.perm & ~0xFF00 == NEGATIVE_KEY_PERM  # owner bits; group bits with the group


def test_a_rule_whose_program_is_missing_is_named(session_keyring: object) -> None:
    missing = f"/nonexistent/{unique('resolver')}"
    with request_key_rule(f"{missing} handle %k %d %u %g %T %P %S") as prefix:
        name = unique("noprogram")
        for _ in range(2):  # the upcall's own requester, then the one the cache answers
            message = _failure(lambda: get_secret(name, prefix=prefix))
            assert NO_RESOLVER in message and THE_NAME not in message, message
            assert f"runs {missing}, which is missing or not executable" in message, message
            assert "the kernel caches such a failed upcall for 60 s" in message, message
        # Doctor lists it with the same origin (in a network namespace of its own: its IMDS
        # probes must not leave this host's network).
        done = subprocess.run(
            ["unshare", "--net", str(KMSKEYS), "doctor", "--prefix", prefix, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        cached = [f for f in json.loads(done.stdout)["findings"] if f["check"] == "cached"]
        origin = "no resolver answered"
        assert any(origin in f["message"] and missing in f["message"] for f in cached), cached


def test_a_non_root_requester_the_host_refuses_is_told_so(resolver: Install) -> None:
    """On a host that refuses upcalls of non-root requesters, the first request fails with
    ENOENT and the kernel caches ENOKEY for 60 s: the second request's message says what
    happened. On a host that runs them, the resolver answers, and says so."""
    caps = capabilities()
    assert not isinstance(caps, str), caps
    name = unique("refusedhost")

    def twice() -> list[object]:
        out: list[object] = []
        for _ in range(2):
            try:
                get_secret(name, prefix=resolver.prefix)
                out.append("resolved")
            except OSError as exc:
                out.append([exc.errno, str(exc)])
        return out

    result = as_user(NOBODY, twice, mode="setuid")
    assert isinstance(result, dict) and "ok" in result, result
    (first_errno, _), (second_errno, second) = result["ok"]
    if caps.non_root.works:
        assert (first_errno, second_errno) == (errno.ENOKEY, errno.ENOKEY), result
        assert "the resolver's answer" in second and NO_RESOLVER not in second, second
    else:
        assert (first_errno, second_errno) == (errno.ENOENT, errno.ENOKEY), result
        assert NO_RESOLVER in second and THE_NAME not in second, second
        assert "may refuse upcalls of non-root requesters" in second, second
