"""A flush happens before every answer that starts after it (issue 20.6; kmskeys/flushepoch.py).

Through the real upcall: the proxy holds the resolver's KMS Decrypt of the old blob, root deploys
a new blob and flushes the name (while a root process is resolving it: issue 26's flush bug),
then the Decrypt goes on. The miss in flight must not land the old value, in the requester's
keyring or in the host cache: it resolves again and answers the new one.

Through the resolver daemon, the last comparison is kmskeys-gate's: a flush that lands after the
daemon read the tokens for the last time, before the gate answers, is injected there (the real
daemon, with a hook that bumps the name's token right after that read, as root's flush does
first).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kmskeys import Key, Keyring, TemporarilyUnavailableError
from tests.support.kms_proxy import ProxiedRequest
from tests.support.names import unique
from tests.support.resolver_daemon import resolver_daemon
from tests.upcall.conftest import KMSKEYS, Install

pytestmark = pytest.mark.upcall


def _flush(install: Install, name: str) -> subprocess.CompletedProcess[str]:
    # In a session keyring of its own, as a root shell or an SSM command runs it.
    argv = ["keyctl", "session", "-", str(KMSKEYS), "flush", name, "--prefix", install.prefix]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _fresh_get(install: Install, name: str) -> str:
    # Another session keyring: only the host cache (or KMS) can answer it.
    argv = ["keyctl", "session", "-", str(KMSKEYS), "get", name, "--prefix", install.prefix]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _held_decrypt() -> tuple[Callable[[ProxiedRequest], Any], threading.Event, threading.Event]:
    """A proxy hook that holds the first Decrypt until released; (hook, entered, release)."""
    entered, release = threading.Event(), threading.Event()

    def hook(request: ProxiedRequest) -> None:
        if request.operation == "Decrypt" and not entered.is_set():
            entered.set()
            release.wait(30)

    return hook, entered, release


def test_a_miss_in_flight_when_root_flushes_resolves_again(resolver: Install) -> None:
    name = unique("epoch")
    resolver.deploy(name, resolver.blob(b"kmst-old", name))
    hook, entered, release = _held_decrypt()
    resolver.proxy.set_fault(hook)  # type: ignore[union-attr]
    got: list[bytes | BaseException] = []

    def ask() -> None:
        try:
            got.append(resolver.get(name))
        except BaseException as exc:  # reported below
            got.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    try:
        assert entered.wait(20), "the resolver never asked KMS"
        resolver.deploy(name, resolver.blob(b"kmst-new", name))
        flushed = _flush(resolver, name)
        # Root's flush while a root process resolves the same name succeeds.
        assert flushed.returncode == 0, flushed.stderr
    finally:
        release.set()
        asking.join(60)
    # The Decrypt of the old blob answered after the flush: never landed, resolved again.
    assert got == [b"kmst-new"], (got, resolver.log.drain())
    assert resolver.decrypts() == 2
    # Nor did it land in the host cache: another keyring gets the new value, without KMS.
    assert _fresh_get(resolver, name) == "kmst-new"
    assert resolver.decrypts() == 2
    line = " ".join(resolver.log.drain())
    assert "kmst-old" not in line and "kmst-new" not in line


def test_a_flush_of_another_name_leaves_a_miss_in_flight_alone(resolver: Install) -> None:
    name, other = unique("epoch"), unique("epoch")
    for each in (name, other):
        resolver.deploy(each, resolver.blob(b"kmst-value", each))
    hook, entered, release = _held_decrypt()
    resolver.proxy.set_fault(hook)  # type: ignore[union-attr]
    got: list[bytes] = []
    asking = threading.Thread(target=lambda: got.append(resolver.get(name)))
    asking.start()
    try:
        assert entered.wait(20), "the resolver never asked KMS"
        assert _flush(resolver, other).returncode == 0
    finally:
        release.set()
        asking.join(60)
    # The epoch is the name's: one Decrypt, and the host cache keeps what it made.
    assert got == [b"kmst-value"]
    assert resolver.decrypts() == 1
    assert _fresh_get(resolver, name) == "kmst-value"
    assert resolver.decrypts() == 1


def test_a_flush_while_nothing_is_in_flight_costs_no_extra_call(resolver: Install) -> None:
    name = unique("epoch")
    resolver.deploy(name, resolver.blob(b"kmst-v1", name))
    assert _fresh_get(resolver, name) == "kmst-v1"
    resolver.deploy(name, resolver.blob(b"kmst-v2", name))
    assert _flush(resolver, name).returncode == 0
    assert _fresh_get(resolver, name) == "kmst-v2"
    assert _fresh_get(resolver, name) == "kmst-v2"
    assert resolver.decrypts() == 2


# `kmskeys-resolver serve` whose last read of a request's flush tokens (before it sends the
# Outcome) is followed at once by root's flush of names that start with MARKER: the flush lands
# between the daemon's comparison and the gate's.
_FLUSH_AFTER_READ = """
import sys
from kmskeys import flushepoch
from resolver.cli import main

read = flushepoch.Mark.tokens

def tokens(self):
    found = read(self)
    if found is not None and (self.name or "").startswith(MARKER):
        flushepoch.bump(self.state_dir, self.prefix, self.name)
    return found

flushepoch.Mark.tokens = tokens
sys.exit(main())
"""


@contextmanager
def _daemon_flushing_after_read(install: Install, sock: Path, marker: str) -> Iterator[None]:
    scripts = Path(tempfile.mkdtemp(prefix="kmst-flushhook-"))
    try:
        script = scripts / "kmskeys-resolver"
        script.write_text(f"#!{sys.executable}\nMARKER = {marker!r}\n{_FLUSH_AFTER_READ}")
        script.chmod(0o700)
        with resolver_daemon(install.config, sock, script):
            yield
    finally:
        shutil.rmtree(scripts, ignore_errors=True)


def test_a_flush_after_the_daemons_last_check_is_seen_by_the_gate(
    extra_install: Callable[..., Any],
) -> None:
    run = Path(tempfile.mkdtemp(prefix="kmst-daemon-"))
    sock = run / "resolver.sock"
    marker = unique("gateflush")
    flushed, kept = f"{marker}-flushed", unique("gatekept")
    try:
        with extra_install(warm_socket=sock, deadline=4, daemon_wait=0.5) as install:
            for name in (flushed, kept):
                install.deploy(name, install.blob(b"kmst-value", name))
            with _daemon_flushing_after_read(install, sock, marker):
                Keyring.join_session()
                # Answered by the daemon, flushed before the gate instantiated: EAGAIN.
                with pytest.raises(TemporarilyUnavailableError):
                    Key.request(install.description(flushed), b"").read()
                line = install.log.wait_for(flushed)
                assert "errno=EAGAIN" in line, line
                assert "flushed by root while resolving; ask again" in line, line
                # Never cached (EAGAIN): the next request is a miss of its own (flushed again
                # by the hook, and so EAGAIN again: nothing of the first answer is kept).
                with pytest.raises(TemporarilyUnavailableError):
                    Key.request(install.description(flushed), b"").read()
                assert "flushed by root" in install.log.wait_for(flushed)
                # The control: a name no flush reaches is answered on the same path.
                assert Key.request(install.description(kept), b"").read() == b"kmst-value"
                assert "outcome=ok" in install.log.wait_for(kept)
    finally:
        Keyring.join_session()
        shutil.rmtree(run, ignore_errors=True)
