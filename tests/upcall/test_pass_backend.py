"""`pass:` as a backend of the real resolver: `kmskeys-resolver install --rules pass`, a test
user's real store, key and agent, requests through the real upcall.

The requester is the test user (each kind this machine supports, tests/support/requester.py):
`get_secret`, `kmskeys get` and `kmskeys exec` in that user's process. The resolver reads the
store of the kernel's %u as that user, answers with the same one log line as every miss, keeps
nothing in the host cache, and gives a locked agent an EAGAIN whose message says to unlock it.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.stored.harness import StoredInstall, stored_installed
from tests.support.names import unique_prefix
from tests.support.passgpg import PassOwner, missing, pass_user, scratch
from tests.support.requester import Requester, as_user

pytestmark = [pytest.mark.upcall, pytest.mark.tokens]

PASS_TTL = 120
SECRET_BYTES = (b"hunter2", b"alice", b"example.invalid", b"linked", b"not yours")


@pytest.fixture(scope="module")
def owner() -> Iterator[PassOwner]:
    """A test user with a real key, agent and populated store (tests/support/passgpg.py)."""
    lacking = missing()
    if lacking:
        pytest.fail("the pass: backend tests cannot run here; missing: " + "; ".join(lacking))
    with scratch() as base, pass_user(base) as made:
        yield made


@pytest.fixture(scope="module")
def installed() -> Iterator[StoredInstall]:
    """A resolver whose rule routes a unique pass prefix; its ttl the pass default."""
    with stored_installed(rules="pass", pass_prefix=unique_prefix(), pass_ttl=PASS_TTL) as made:
        yield made


@pytest.fixture
def install(installed: StoredInstall, owner: PassOwner) -> Iterator[StoredInstall]:
    """The install with its log drained and the user's agent running and unlocked."""
    owner.start_agent_if_stopped()
    owner.unlock()
    installed.log.drain()
    yield installed
    owner.start_agent_if_stopped()


def prefix_of(install: StoredInstall) -> str:
    """The pass prefix the install serves."""
    return str(install.settings["pass_prefix"])


def read(prefix: str, reference: str) -> dict[str, Any]:
    """In the requester: get_secret(reference, prefix=...), or the error's class and message."""
    from kmskeys import get_secret

    try:
        return {"value": get_secret(reference, prefix=prefix).decode()}
    except Exception as exc:
        return {"error": type(exc).__name__, "errno": getattr(exc, "errno", None), "text": str(exc)}


def cli(argv: list[str]) -> dict[str, Any]:
    """In the requester: `kmskeys ARGV` as this process (forked, so that `exec` may replace it):
    its exit status and output. The requester's credentials, fsuid included, are inherited."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        # pytest's capture replaced sys.stdout: the CLI writes to the real descriptors here.
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        code = 1
        try:
            from kmskeys.cli import main

            code = main(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    out, err = _drain(out_r), _drain(err_r)
    _, status = os.waitpid(pid, 0)
    return {"status": os.waitstatus_to_exitcode(status), "out": out, "err": err}


def _drain(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def _lines_are_silent(lines: list[str], owner: PassOwner) -> None:
    for line in lines:
        for secret in (*SECRET_BYTES, owner.passphrase.encode()):
            assert secret.decode() not in line, line


def test_get_secret_reads_the_users_own_entry_as_that_user(
    install: StoredInstall, owner: PassOwner, requester: Requester
) -> None:
    prefix = prefix_of(install)
    user = owner.pw.pw_name

    def session() -> dict[str, object]:
        return {ref: read(prefix, ref) for ref in ("email/work", "email/work#field=owner")}

    got = requester.run(user, session)
    assert got == {
        "ok": {"email/work": {"value": "hunter2"}, "email/work#field=owner": {"value": user}}
    }
    line = install.log.wait_for("email/work")
    assert " outcome=ok " in line and " source=pass " in line and f" user={user} " in line, line
    assert " mode=first " in line and "gpg:" in line, line
    _lines_are_silent([line, *install.log.drain()], owner)


def test_kmskeys_get_and_exec_take_the_selectors(
    install: StoredInstall, owner: PassOwner, requester: Requester
) -> None:
    prefix = prefix_of(install)

    def session() -> dict[str, object]:
        return {
            "get": cli(["get", "--prefix", prefix, "email/work#field=login"]),
            "all": cli(["get", "--prefix", prefix, "email/work#all"]),
            "exec": cli(
                [
                    "exec",
                    "--prefix",
                    prefix,
                    "--env",
                    "PW=email/work",
                    "--env",
                    "URL=email/work#field=url",
                    "--",
                    "/bin/sh",
                    "-c",
                    'printf "%s %s" "$PW" "$URL"',
                ]
            ),
            # No backend's grammar takes an empty field key (`#first` would be an sm: field).
            "bad": cli(["get", "--prefix", prefix, "email/work#field="]),
        }

    got = requester.run(owner.pw.pw_name, session)
    assert isinstance(got, dict) and "ok" in got, got
    found = got["ok"]
    assert (found["get"]["status"], found["get"]["out"]) == (0, "alice")
    assert found["all"]["out"].startswith("hunter2\nlogin: alice\n")
    assert found["exec"] == {
        "status": 0,
        "out": "hunter2 https://example.invalid/login",
        "err": "",
    }
    # A selector outside the grammar never reaches the kernel: a usage error, said locally.
    assert found["bad"]["status"] == 2 and "#all or #field=KEY" in found["bad"]["err"]


def test_a_locked_agent_is_eagain_saying_unlock_and_unlocking_is_enough(
    install: StoredInstall, owner: PassOwner, requester: Requester
) -> None:
    prefix = prefix_of(install)
    owner.lock()
    got = requester.run(owner.pw.pw_name, lambda: read(prefix, "email/work#field=login"))
    assert isinstance(got, dict) and "ok" in got, got
    failed = got["ok"]
    assert (failed["error"], failed["errno"]) == ("TemporarilyUnavailableError", errno.EAGAIN)
    assert "gpg-agent is locked" in failed["text"] and "pass show email/work" in failed["text"]
    line = install.log.wait_for("email/work")
    assert " outcome=locked " in line and "unlock" in line, line
    # The user's own state, not an outage: logged as a warning, not an alarm (ERR).
    assert line.startswith("<84>"), line  # authpriv (10) * 8 + LOG_WARNING (4)
    # EAGAIN is never cached: the first request after unlocking resolves.
    owner.unlock()
    got = requester.run(owner.pw.pw_name, lambda: read(prefix, "email/work#field=login"))
    assert got == {"ok": {"value": "alice"}}
    assert " outcome=ok " in install.log.wait_for("email/work")
    owner.stop_agent()
    got = requester.run(owner.pw.pw_name, lambda: read(prefix, "email/work"))
    assert isinstance(got, dict) and got["ok"]["errno"] == errno.EAGAIN, got
    assert " outcome=locked " in install.log.wait_for("email/work")


def test_refusals_and_unknown_entries_reach_the_user_as_their_class(
    install: StoredInstall, owner: PassOwner, requester: Requester
) -> None:
    prefix = prefix_of(install)
    cases = {
        "email/real": ("KeyRejectedError", "outcome=refused", "symbolic link"),
        "big#all": ("KeyRejectedError", "outcome=refused", "larger than"),
        "foreign": ("KeyRejectedError", "outcome=refused", "owned by uid 65534"),
        "email/nothere": ("KeyNotFoundError", "outcome=unknown", "does not exist"),
        "email/work#field=password": ("KeyRejectedError", "outcome=refused", "no 'password'"),
    }

    def session() -> dict[str, object]:
        return {ref: read(prefix, ref) for ref in cases}

    got = requester.run(owner.pw.pw_name, session)
    assert isinstance(got, dict) and "ok" in got, got
    for ref, (error, outcome, reason) in cases.items():
        assert got["ok"][ref]["error"] == error, (ref, got["ok"][ref])
        line = install.log.wait_for(ref.partition("#")[0])
        assert f" {outcome} " in line and reason in line, (ref, line)
    _lines_are_silent(install.log.drain(), owner)


def test_a_pass_key_lives_pass_ttl_and_never_reaches_the_host_cache(
    install: StoredInstall, owner: PassOwner, requester: Requester
) -> None:
    prefix = prefix_of(install)

    def session() -> dict[str, object]:
        from kmskeys import prockeys

        value = read(prefix, "email/work#field=url")
        desc = f"{prefix}:email/work#field=url"
        expiry = [k.expiry for k in prockeys.keys().values() if k.description == desc]
        return {"value": value, "expiry": expiry}

    got = requester.run(owner.pw.pw_name, session)
    assert isinstance(got, dict) and "ok" in got, got
    assert got["ok"]["value"] == {"value": "https://example.invalid/login"}
    # /proc/keys shows the timeout in whole minutes past 60 s: PASS_TTL +- 10 % is 1 or 2 m.
    assert got["ok"]["expiry"] and got["ok"]["expiry"][0] in ("1m", "2m"), got
    install.log.wait_for("email/work")

    def host_cache_descriptions() -> list[str]:
        from kmskeys import keyutils
        from kmskeys.hostflush import host_cache_ring

        ring = host_cache_ring(create=False)
        if ring is None:
            return []
        from kmskeys.errors import KmsKeysError

        found = []
        for serial in memoryview(keyutils.keyctl_read(ring)).cast("i").tolist():
            try:
                found.append(keyutils.keyctl_describe_alloc(serial).decode().split(";", 4)[4])
            except KmsKeysError:
                continue  # another test's entry, expired or invalidated meanwhile
        return found

    cached = as_user("root", host_cache_descriptions)
    assert isinstance(cached, dict) and "ok" in cached, cached
    assert not [d for d in cached["ok"] if f"{prefix}:" in d], cached
