"""Blobs become kernel keys through the real upcall: exact bytes, cached, expired, flushed."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kmskeys import Key, Keyring
from kmskeys.blob import parse_blob
from tests.support.kms_proxy import ProxiedRequest
from tests.support.names import unique
from tests.support.ttl import gone_after
from tests.upcall.conftest import KMSKEYS, SHORT_TTL, Install

pytestmark = pytest.mark.upcall


def _payload(size: int) -> bytes:
    # Every byte value, NULs included: the payload must come back byte-exact.
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def test_inline_blob_round_trip_one_byte(resolver: Install) -> None:
    name = unique("one")
    assert resolver.get(name, resolver.blob(b"\x00", name)) == b"\x00"
    assert "outcome=ok" in resolver.log.wait_for(name)


@pytest.mark.parametrize("size", [1, 4096, 32767])
def test_blob_file_round_trip(resolver: Install, size: int) -> None:
    name = unique(f"file{size}")
    payload = _payload(size)
    text = resolver.blob(payload, name)
    # 4096 bytes is the largest direct-mode secret; 32767 (the `user` key limit) needs envelope.
    assert parse_blob(text).mode == ("envelope" if size > 4096 else "direct")
    resolver.deploy(name, text + "\n")
    assert resolver.get(name) == payload
    line = resolver.log.wait_for(name)
    assert "outcome=ok" in line and "source=blob_dir" in line


def test_inline_envelope_blob(resolver: Install) -> None:
    name = unique("env")
    text = resolver.blob(b"sealed secret", name, envelope=True)
    assert resolver.get(name, text) == b"sealed secret"


def test_blob_in_sub_directory(resolver: Install) -> None:
    name = f"team/{unique('nested')}"
    resolver.deploy(name, resolver.blob(b"nested", name))
    assert resolver.get(name) == b"nested"


def test_kmskeys_get_prints_exact_bytes(resolver: Install) -> None:
    name = unique("cli")
    payload = _payload(300)
    resolver.deploy(name, resolver.blob(payload, name))
    done = subprocess.run(
        [str(KMSKEYS), "get", name, "--prefix", resolver.prefix],
        check=False,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == payload


def test_second_request_is_a_kernel_hit(resolver: Install) -> None:
    name = unique("hit")
    text = resolver.blob(b"cached", name)
    assert resolver.get(name, text) == b"cached"
    assert resolver.get(name, text) == b"cached"
    assert resolver.get(name) == b"cached"
    assert resolver.decrypts() == 1


def test_key_carries_the_ttl_and_expires_into_a_new_resolution(resolver: Install) -> None:
    name = unique("shortttl")  # matches the session config's SHORT_TTL section
    text = resolver.blob(b"short-lived", name)
    assert resolver.get(name, text) == b"short-lived"
    assert resolver.decrypts() == 1
    time.sleep(gone_after(SHORT_TTL))
    assert resolver.get(name, text) == b"short-lived"
    assert resolver.decrypts() == 2


def test_default_ttl_is_set_on_the_key(resolver: Install) -> None:
    name = unique("ttl")
    resolver.get(name, resolver.blob(b"x", name))
    line = next(
        line
        for line in Path("/proc/keys").read_text().splitlines()
        if line.endswith(f"{resolver.description(name)}: 1")
    )
    # /proc/keys rounds the remaining lifetime up to whole minutes: 300 s shows as "5m".
    assert line.split()[3] in ("4m", "5m"), line


def test_kmskeys_flush_makes_the_next_request_resolve_again(resolver: Install) -> None:
    name = unique("flush")
    resolver.deploy(name, resolver.blob(b"v1", name))
    assert resolver.get(name) == b"v1"
    resolver.deploy(name, resolver.blob(b"v2", name))
    assert resolver.get(name) == b"v1"  # still cached
    done = subprocess.run(
        [str(KMSKEYS), "flush", name, "--prefix", resolver.prefix],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert resolver.get(name) == b"v2"
    assert resolver.decrypts() == 2


def test_herd_of_200_cold_requesters_costs_one_decrypt(resolver: Install) -> None:
    name = unique("herd")
    payload = os.urandom(64)
    text = resolver.blob(payload, name)
    assert resolver.proxy is not None

    def slow_decrypt(request: ProxiedRequest) -> None:
        # Hold KMS back so every thread is already waiting on the key under construction.
        if request.operation == "Decrypt":
            time.sleep(0.5)

    resolver.proxy.set_fault(slow_decrypt)
    start = threading.Barrier(200)
    results: list[bytes | BaseException] = []
    lock = threading.Lock()

    def requester() -> None:
        start.wait()
        try:
            value: bytes | BaseException = resolver.get(name, text)
        except BaseException as exc:
            value = exc
        with lock:
            results.append(value)

    threads = [threading.Thread(target=requester) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 200
    assert all(r == payload for r in results), {repr(r)[:80] for r in results if r != payload}
    assert resolver.decrypts() == 1
    assert "outcome=ok" in resolver.log.wait_for(name)
    assert not [line for line in resolver.log.drain() if f" name={name} " in line]


def test_key_lands_in_the_requesters_destination_keyring(resolver: Install) -> None:
    name = unique("dest")
    ring = Keyring.session()
    key = Key.request(resolver.description(name), resolver.blob(b"here", name), ring)
    assert key in ring.list()
    assert key.read() == b"here"
