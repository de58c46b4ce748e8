"""Examples-tier fixtures: a moto server behind the counting proxy, and a fresh resolver install.

Every test gets its own install (unique prefix, root-owned config, blob_dir, syslog socket) from
the resolver tier's `installed` helper, inside a fresh session keyring that the web servers and
scripts it starts inherit: that is how their children share the key the resolver caches.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.lighttpd import EXAMPLE_CONF, Lighttpd
from tests.upcall.conftest import Install, installed

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
SECRET_NAME = "db-password"  # the name every example asks for


def wait_until_collected(description: str, timeout: float = 5.0) -> None:
    """Wait until /proc/keys no longer lists `description` (the key GC has removed it).

    `kmskeys flush` invalidates; until the kernel's key GC unlinks the invalidated key, a
    request for it fails with EKEYREVOKED instead of upcalling (reported to the lead: flush
    should wait for this itself, and then this wait costs nothing).
    """
    deadline = time.monotonic() + timeout
    while any(_describes(line, description) for line in _keys()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{description} still in /proc/keys {timeout}s after a flush")
        time.sleep(0.005)


def _describes(line: str, description: str) -> bool:
    rest = line.split(None, 8)[-1].rstrip("\n")  # "DESC: SIZE", or just "DESC" when negative
    return rest == description or rest.startswith(description + ": ")


def _keys() -> list[str]:
    with open("/proc/keys") as f:
        return [line for line in f if len(line.split(None, 8)) == 9]


@pytest.fixture(scope="session")
def kms_stack() -> Iterator[tuple[KmsEmulator, KmsProxy, str]]:
    """The session's moto server, the counting proxy in front of it, and one KMS key ARN."""
    emulator = KmsEmulator().start()
    proxy = KmsProxy(emulator.url).start()
    try:
        key_arn = emulator.client().create_key(Description="kmst examples")["KeyMetadata"]["Arn"]
        yield emulator, proxy, key_arn
    finally:
        proxy.stop()
        emulator.stop()


@pytest.fixture
def install(
    kms_stack: tuple[KmsEmulator, KmsProxy, str], session_keyring: object
) -> Iterator[Install]:
    """A resolver install of its own for this test, counts and faults reset."""
    emulator, proxy, key_arn = kms_stack
    proxy.set_fault(None)
    proxy.reset_counts()
    try:
        with installed(emulator, proxy, key_arn) as it:
            yield it
    finally:
        proxy.set_fault(None)


@pytest.fixture
def cgi_server(install: Install, tmp_path: Path) -> Iterator[Lighttpd]:
    """lighttpd with the example's config serving a copy of examples/cgi/secret.py."""
    docroot = tmp_path / "www"
    docroot.mkdir()
    shutil.copy(EXAMPLES / "cgi" / "secret.py", docroot / "secret.py")
    web = Lighttpd(
        EXAMPLE_CONF, tmp_path / "lighttpd", docroot=docroot, python=sys.executable,
        prefix=install.prefix,
    )  # fmt: skip
    with web:
        yield web
