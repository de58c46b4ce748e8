"""`kmskeys exec --watch`: a rotation (blob redeployed, root's host-wide flush) or an expiry
reaches the running command, through the real upcall and a moto server behind the counting
proxy; failures keep the command, refusals stop it (tests/upcall/watching.py runs it)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from kmskeys.cli import EXIT_REFUSED
from tests.support.kms_proxy import ProxiedRequest, kms_error
from tests.support.names import unique
from tests.upcall.conftest import SHORT_TTL, Install
from tests.upcall.watching import (
    INTERVAL,
    WAIT,
    Watching,
    deployed,
    no_secret_in,
    proc_text,
    rotate,
)

pytestmark = pytest.mark.upcall


def test_signal_hup_brings_the_rotated_file_to_the_same_process(resolver: Install) -> None:
    ((name, v1),) = deployed(resolver, 1)
    v2 = unique("v2").encode()
    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--file", f"token={name}"]
    with Watching(resolver, args, ["file=token", "spin=1"]) as run:
        start = run.next("start")
        assert (start["value"], start["dir_mode"], start["file_mode"]) == (v1.hex(), 0o500, 0o400)
        assert resolver.decrypts() == 1
        rotate(resolver, name, resolver.blob(v2, name))
        hup = run.next("hup")
        assert hup["pid"] == start["pid"]  # signalled, not restarted
        assert hup["value"] == v2.hex()
        # Replaced atomically: a reader looping on the file saw the old value or the new one,
        # never a missing, empty or partial file; the directory is sealed again.
        assert set(hup["seen"]) <= {v1.hex(), v2.hex()}, hup["seen"]
        assert (hup["files"], hup["dir_mode"], hup["file_mode"]) == (["token"], 0o500, 0o400)
        assert resolver.decrypts() == 2
        assert run.quiet(1.0) == []  # one change, one signal
    assert any(f"secret {name!r} changed: sent SIGHUP to" in line for line in run.errors)
    assert no_secret_in("".join(run.errors), v1, v2)


def test_rotations_that_race_the_flush_never_stop_the_command(resolver: Install) -> None:
    # Root's flush shares this test's session keyring with the watch here, so after its
    # host-wide pass it may invalidate the very key the watch just had made: request_key then
    # fails with ENOKEY although the resolver answered. The watch asks again before it calls
    # anything a refusal, and every rotation reaches the command.
    ((name, _),) = deployed(resolver, 1)
    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--holdoff", "1"]
    with Watching(resolver, [*args, "--file", f"token={name}"], ["file=token"]) as run:
        start = run.next("start")
        for _ in range(5):
            value = unique("vN").encode()
            rotate(resolver, name, resolver.blob(value, name), shared=True)
            hup = run.next("hup")
            assert (hup["pid"], hup["value"]) == (start["pid"], value.hex())
    assert not any("refused" in line or "stopped" in line for line in run.errors), run.errors


def test_restart_brings_rotated_env_and_file_values_and_no_secret_reaches_the_parent(
    resolver: Install,
) -> None:
    (env_name, v1), (file_name, f1) = deployed(resolver, 2)
    v2, f2 = unique("v2").encode(), unique("f2").encode()
    args = ["--interval", INTERVAL, "--holdoff", "1", "--env", f"TOKEN={env_name}"]
    args += ["--file", f"db={file_name}"]
    with Watching(resolver, args, ["var=TOKEN", "file=db", "exit=0"]) as run:
        first = run.next("start")
        assert (first["env"], first["value"]) == (v1.decode(), f1.hex())
        parent = run.proc.pid
        assert first["ppid"] == parent
        rotate(resolver, env_name, resolver.blob(v2, env_name))
        assert run.next("term")["pid"] == first["pid"]  # the old command was stopped
        second = run.next("start")
        assert second["pid"] != first["pid"] and second["ppid"] == parent
        assert (second["env"], second["value"]) == (v2.decode(), f1.hex())
        rotate(resolver, file_name, resolver.blob(f2, file_name))
        assert run.next("term")["pid"] == second["pid"]
        third = run.next("start")
        assert third["pid"] not in (first["pid"], second["pid"]) and third["ppid"] == parent
        assert (third["env"], third["value"], third["file_mode"]) == (v2.decode(), f2.hex(), 0o400)
        # The parent's argv and environment hold no secret, old or new, nor does the command's
        # argv; the command's own environment has its --env value, as asked.
        for what in ("cmdline", "environ"):
            assert no_secret_in(proc_text(parent, what), v1, v2, f1, f2), what
        assert no_secret_in(proc_text(third["pid"], "cmdline"), v1, v2, f1, f2)
    assert sum("changed: restarting" in line for line in run.errors) == 2, run.errors


def test_an_idle_watch_asks_nothing_and_untouched_secrets_cost_no_call(
    resolver: Install,
) -> None:
    (one, _), (two, _) = deployed(resolver, 2)
    v2 = unique("v2").encode()
    args = ["--on-change=signal:HUP", "--interval", INTERVAL]
    args += ["--file", f"one={one}", "--file", f"two={two}"]
    with Watching(resolver, args, ["file=two"]) as run:
        run.next("start")
        assert resolver.proxy is not None
        resolver.proxy.reset_counts()
        resolver.log.drain()
        time.sleep(10 * float(INTERVAL))  # ten polls
        assert resolver.decrypts() == 0
        assert resolver.log.drain() == []  # not even an upcall
        rotate(resolver, two, resolver.blob(v2, two))
        assert run.next("hup")["value"] == v2.hex()  # the watch was watching all along
        time.sleep(5 * float(INTERVAL))
        # The rotated secret cost one Decrypt; the untouched one, none: not even an upcall.
        # (Root's flush may also catch the key the watch made a moment after the rotation, as
        # root's flush reaches every key root can see: one more upcall, from the host cache.)
        assert resolver.decrypts() == 1
        lines = resolver.log.drain()
        assert lines and all(f" name={two} " in line for line in lines), lines


def test_an_expired_key_is_resolved_again_and_only_a_new_value_acts(resolver: Install) -> None:
    # A name with the session config's short ttl: its key expires within SHORT_TTL seconds, and
    # the watch resolves it again on its own, no flush needed.
    name, v1, v2 = unique("shortttl"), unique("v1").encode(), unique("v2").encode()
    resolver.deploy(name, resolver.blob(v1, name))
    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--file", f"token={name}"]
    with Watching(resolver, args, ["file=token"]) as run:
        start = run.next("start")
        resolver.log.drain()
        # Two lifetimes with the same value: resolved again each time, the command left alone.
        assert run.quiet(2 * SHORT_TTL + 1) == []
        assert len([line for line in resolver.log.drain() if f" name={name} " in line]) >= 2
        resolver.deploy(name, resolver.blob(v2, name))  # a redeploy, and no flush
        hup = run.next("hup", timeout=SHORT_TTL + WAIT)
        assert (hup["pid"], hup["value"]) == (start["pid"], v2.hex())


def test_a_flapping_secret_gets_one_action_per_holdoff(resolver: Install) -> None:
    ((name, _),) = deployed(resolver, 1)
    values = [unique(f"v{i}").encode() for i in (2, 3, 4)]
    blobs = [resolver.blob(value, name) for value in values]
    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--holdoff", "3"]
    with Watching(resolver, [*args, "--file", f"token={name}"], ["file=token"]) as run:
        run.next("start")
        rotate(resolver, name, blobs[0])
        first = run.next("hup")
        assert first["value"] == values[0].hex()
        rotate(resolver, name, blobs[1])
        time.sleep(0.6)
        rotate(resolver, name, blobs[2])
        second = run.next("hup")
        # The two later changes were merged into one signal, at the end of the holdoff, with
        # the newest value; the command never had the one in between.
        assert second["value"] == values[2].hex()
        assert second["t"] - first["t"] >= 3 - 0.1  # the command's own clock
        assert run.quiet(1.5) == []
    assert sum("changed: sent SIGHUP" in line for line in run.errors) == 2, run.errors


def test_a_failed_re_resolution_keeps_the_old_value_and_the_command(resolver: Install) -> None:
    ((name, v1),) = deployed(resolver, 1)
    v2 = unique("v2").encode()
    assert resolver.proxy is not None

    def throttled(request: ProxiedRequest) -> Any:
        return kms_error("ThrottlingException") if request.operation == "Decrypt" else None

    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--file", f"token={name}"]
    with Watching(resolver, args, ["file=token"]) as run:
        start = run.next("start")
        resolver.proxy.set_fault(throttled)
        rotate(resolver, name, resolver.blob(v2, name))
        deadline = time.monotonic() + WAIT
        while not any("could not be resolved again" in line for line in run.errors):
            assert time.monotonic() < deadline, run.errors
            time.sleep(0.1)
        os.kill(run.proc.pid, signal.SIGUSR1)  # forwarded: the command reports its file
        kept = run.next("usr1")
        assert (kept["pid"], kept["value"]) == (start["pid"], v1.hex())
        assert not [e for e in run.seen if e["event"] == "hup"]
        resolver.proxy.set_fault(None)  # KMS is back: the next retry gets the new value
        hup = run.next("hup")
        assert (hup["pid"], hup["value"]) == (start["pid"], v2.hex())
    failed = [line for line in run.errors if "could not be resolved again" in line]
    assert all("the command keeps the value it has; retrying in" in line for line in failed)
    assert no_secret_in("".join(run.errors), v1, v2)


def test_a_refused_secret_stops_the_command_and_removes_its_file(resolver: Install) -> None:
    ((name, v1),) = deployed(resolver, 1)
    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--file", f"token={name}"]
    with Watching(resolver, args, ["file=token", "exit=0"]) as run:
        start = run.next("start")
        # A blob made for another name: KMS refuses it under this one (the context binds the
        # name), so the resolver answers EKEYREJECTED, as for a revoked permission.
        rotate(resolver, name, resolver.blob(b"kmst-elsewhere", unique("other")))
        term = run.next("term")
        assert term["pid"] == start["pid"]
        assert term["files"] == []  # removed before the command was stopped
        assert run.wait() == EXIT_REFUSED
    last = run.errors[-1]
    assert f"secret {name!r}:" in last and "stopped" in last and "--on-revoke=stop" in last
    assert no_secret_in("".join(run.errors), v1)


def test_on_revoke_keep_leaves_the_command_running_on_its_value(resolver: Install) -> None:
    ((name, v1),) = deployed(resolver, 1)
    args = ["--on-change=signal:HUP", "--interval", INTERVAL, "--on-revoke=keep"]
    with Watching(resolver, [*args, "--file", f"token={name}"], ["file=token"]) as run:
        start = run.next("start")
        rotate(resolver, name, resolver.blob(b"kmst-elsewhere", unique("other")))
        deadline = time.monotonic() + WAIT
        while not any("--on-revoke=keep" in line for line in run.errors):
            assert time.monotonic() < deadline, run.errors
            time.sleep(0.1)
        os.kill(run.proc.pid, signal.SIGUSR1)
        kept = run.next("usr1")
        assert (kept["pid"], kept["value"]) == (start["pid"], v1.hex())
        assert run.proc.poll() is None
