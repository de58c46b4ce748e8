"""A flush happens before every answer that starts after it (issue 20.6; kmskeys/flushepoch.py).

Through the real upcall: the proxy holds the resolver's KMS Decrypt of the old blob, root deploys
a new blob and flushes the name (while a root process is resolving it: issue 26's flush bug),
then the Decrypt goes on. The miss in flight must not land the old value, in the requester's
keyring or in the host cache: it resolves again and answers the new one.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.kms_proxy import ProxiedRequest
from tests.support.names import unique
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
        import time

        t0 = time.monotonic()
        flushed = _flush(resolver, name)
        print("FLUSHTIME", time.monotonic() - t0, flushed.stdout, flushed.stderr)
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
