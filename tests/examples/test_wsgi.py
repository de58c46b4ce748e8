"""examples/wsgi under wsgiref: secrets are read per request, so flush and rotation just work."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.examples.conftest import BIN, EXAMPLES, SECRET_NAME, wait_until_collected
from tests.support.kms_emulator import free_port
from tests.support.kms_proxy import kms_error
from tests.upcall.conftest import Install

pytestmark = pytest.mark.examples

APP = EXAMPLES / "wsgi" / "app.py"


class WsgiApp:
    """The example app in its own process (inheriting the test's session keyring)."""

    def __init__(self, prefix: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(APP), "--port", str(self.port), "--prefix", prefix],
            env={**os.environ, "KMSKEYS_NAMES": SECRET_NAME},  # as the deployer's unit sets it
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"app.py exited: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get(self, path: str) -> tuple[int, dict[str, object]]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=10)
        return err


@pytest.fixture
def app(install: Install) -> Iterator[WsgiApp]:
    server = WsgiApp(install.prefix)
    try:
        yield server
    finally:
        server.stop()


def flush(install: Install) -> None:
    done = subprocess.run(
        [str(BIN / "kmskeys"), "flush", SECRET_NAME, "--prefix", install.prefix],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    wait_until_collected(install.description(SECRET_NAME))


def sha(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()[:16]


def test_secret_deployed_after_start_is_served_without_restart(
    install: Install, app: WsgiApp
) -> None:
    # The app is already running and nothing is deployed: an import-time read would have died.
    status, doc = app.get(f"/{SECRET_NAME}")
    assert (status, doc) == (500, {"error": "KeyNotFoundError"})
    secret = b"first-" + hashlib.sha256(install.prefix.encode()).hexdigest().encode()
    install.deploy(SECRET_NAME, install.blob(secret, SECRET_NAME))
    flush(install)  # drop the cached "unknown" instead of waiting for the negative TTL
    status, doc = app.get(f"/{SECRET_NAME}")
    assert status == 200
    assert doc == {"name": SECRET_NAME, "sha256": sha(secret), "bytes": len(secret)}
    assert secret.decode() not in json.dumps(doc)


def test_rotation_and_flush_reach_the_running_app(install: Install, app: WsgiApp) -> None:
    old, new = b"old-password-1", b"new-password-2"
    install.deploy(SECRET_NAME, install.blob(old, SECRET_NAME))
    assert app.get("/")[1]["sha256"] == sha(old)
    install.deploy(SECRET_NAME, install.blob(new, SECRET_NAME))
    assert app.get("/")[1]["sha256"] == sha(old)  # cached: nothing asked KMS again
    assert install.decrypts() == 1
    flush(install)
    assert app.get("/")[1]["sha256"] == sha(new)
    assert install.decrypts() == 2


def test_names_outside_the_allow_list_are_never_looked_up(install: Install, app: WsgiApp) -> None:
    install.deploy("other", install.blob(b"other-secret", "other"))
    status, doc = app.get("/other")
    assert (status, doc) == (404, {"error": "no such secret here"})
    assert install.decrypts() == 0


def test_kms_throttling_is_503(install: Install, app: WsgiApp) -> None:
    install.deploy(SECRET_NAME, install.blob(b"x-secret", SECRET_NAME))
    assert install.proxy is not None
    install.proxy.set_fault(lambda request: kms_error("ThrottlingException"))
    assert app.get("/")[0] == 503


def test_no_names_configured_refuses_to_start() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KMSKEYS_NAMES"}
    command = [sys.executable, str(APP), "--port", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "set KMSKEYS_NAMES" in done.stderr
