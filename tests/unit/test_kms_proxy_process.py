"""The counting proxy in a process of its own (tests/support/kms_proxy_process.py), which the
flood row of `make bench` runs as its KMS stand-in: it forwards, counts, holds only the calls
its rule names, leads its own session, and stops with its stdin."""

from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.kms_proxy_process import KmsProxyProcess

pytestmark = pytest.mark.unit

HOLD = 3.0


class _Upstream(BaseHTTPRequestHandler):
    """Answers every POST with its own body, as JSON-ish bytes."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _call(url: str, operation: str, body: bytes) -> bytes:
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname or "", parsed.port, timeout=30)
    try:
        conn.request("POST", "/", body=body, headers={"X-Amz-Target": f"TrentService.{operation}"})
        response = conn.getresponse()
        assert response.status == 200
        return response.read()
    finally:
        conn.close()


def test_forwards_and_counts_per_operation(upstream: str) -> None:
    with KmsProxyProcess(upstream) as proxy:
        assert _call(proxy.url, "Decrypt", b'{"a": 1}') == b'{"a": 1}'
        _call(proxy.url, "Decrypt", b"{}")
        _call(proxy.url, "Encrypt", b"{}")
        assert (proxy.count("Decrypt"), proxy.count("Encrypt"), proxy.count()) == (2, 1, 3)
        proxy.reset_counts()
        assert proxy.count() == 0


def test_holds_only_the_operation_whose_body_holds_the_marker(upstream: str) -> None:
    with KmsProxyProcess(upstream) as proxy:
        proxy.hold("Decrypt", "kmst-held", HOLD)
        took: list[float] = []

        def held() -> None:
            start = time.monotonic()
            _call(proxy.url, "Decrypt", b'{"name": "kmst-held-1"}')
            took.append(time.monotonic() - start)

        thread = threading.Thread(target=held)
        thread.start()
        # Neither another name's Decrypt nor another operation with the marker waits for it.
        _call(proxy.url, "Decrypt", b'{"name": "kmst-other"}')
        _call(proxy.url, "Encrypt", b'{"name": "kmst-held-2"}')
        assert thread.is_alive()
        thread.join()
        assert took[0] >= HOLD
        proxy.hold(None)
        start = time.monotonic()
        _call(proxy.url, "Decrypt", b'{"name": "kmst-held-3"}')
        assert time.monotonic() - start < HOLD
        assert proxy.count("Decrypt") == 3


def test_leads_its_own_session_and_stops_with_its_stdin(upstream: str) -> None:
    proxy = KmsProxyProcess(upstream).start()
    pid, url = proxy.pid, proxy.url
    try:
        assert os.getsid(pid) == pid
    finally:
        proxy.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        _call(url, "Decrypt", b"{}")


def test_refuses_a_malformed_hold(upstream: str) -> None:
    with KmsProxyProcess(upstream) as proxy:
        with pytest.raises(RuntimeError, match="seconds a number"):
            proxy.hold("Decrypt", "kmst", -1)
        assert proxy.count() == 0  # still answering
