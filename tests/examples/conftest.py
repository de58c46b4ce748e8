"""Examples-tier fixtures: a moto server behind the counting proxy, and a fresh resolver install.

Every test gets its own install (unique prefix, root-owned config, blob_dir, syslog socket) from
the resolver tier's `installed` helper, inside a fresh session keyring that the web servers and
scripts it starts inherit: that is how their children share the key the resolver caches.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.lighttpd import EXAMPLE_CONF, Lighttpd
from tests.support.nginx import NGINX_CONF, NginxFcgiwrap
from tests.upcall.conftest import Install, installed

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
SECRET_NAME = "db-password"  # the name every example asks for


def page_fields(body: str) -> dict[str, str]:
    """The values secret.py's page marks with an id (name, fingerprint, size, pid, us)."""
    return dict(re.findall(r'id="(\w+)">([^<]*)<', body))


def fingerprint(secret: bytes) -> str:
    """What secret.py shows of a secret: the first 16 hex digits of its sha256."""
    return hashlib.sha256(secret).hexdigest()[:16]


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


def lighttpd_for(install: Install, tmp_path: Path, secret: str) -> Lighttpd:
    """lighttpd with the example's config serving a copy of examples/cgi/secret.py, which reads
    the secret named `secret` (setenv in the config, as a deployer names it)."""
    docroot = tmp_path / "www"
    docroot.mkdir(exist_ok=True)
    shutil.copy(EXAMPLES / "cgi" / "secret.py", docroot / "secret.py")
    shutil.copy(EXAMPLES / "cgi" / "secret_page.py", docroot / "secret_page.py")
    return Lighttpd(
        EXAMPLE_CONF, tmp_path / "lighttpd", docroot=docroot, python=sys.executable,
        prefix=install.prefix, secret=secret,
    )  # fmt: skip


def nginx_for(install: Install, tmp_path: Path, secret: str) -> NginxFcgiwrap:
    """nginx + fcgiwrap with the example's config; secret.py installed as a deployer would: its
    first line names the interpreter that has kmskeys, and it is executable."""
    docroot = tmp_path / "www"
    docroot.mkdir(exist_ok=True)
    script = docroot / "secret.py"
    script.write_text(f"#!{sys.executable}\n" + (EXAMPLES / "cgi" / "secret.py").read_text())
    script.chmod(0o755)
    shutil.copy(EXAMPLES / "cgi" / "secret_page.py", docroot / "secret_page.py")
    return NginxFcgiwrap(
        NGINX_CONF, tmp_path / "nginx", script, docroot=docroot, prefix=install.prefix,
        secret=secret,
    )  # fmt: skip


@pytest.fixture
def cgi_server(install: Install, tmp_path: Path) -> Iterator[Lighttpd]:
    """lighttpd serving secret.py for SECRET_NAME."""
    with lighttpd_for(install, tmp_path, SECRET_NAME) as web:
        yield web


@pytest.fixture
def nginx_server(install: Install, tmp_path: Path) -> Iterator[NginxFcgiwrap]:
    """nginx + fcgiwrap serving secret.py for SECRET_NAME."""
    with nginx_for(install, tmp_path, SECRET_NAME) as web:
        yield web
