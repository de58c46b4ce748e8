"""A counting, fault-injecting HTTP reverse proxy on 127.0.0.1 in front of the AWS emulator.

    proxy = KmsProxy(emulator.url).start()
    ... point the resolver's endpoint_url at proxy.url ...
    proxy.count("Decrypt")            # requests whose X-Amz-Target is TrentService.Decrypt
    proxy.count("GetSecretValue")     # secretsmanager.GetSecretValue (Secrets Manager)
    proxy.count("GetParameter")       # AmazonSSM.GetParameter (Parameter Store)
    proxy.set_fault(lambda req: Fault(503, body=b'{"__type":"ThrottlingException"}'))
    proxy.set_fault(lambda req: time.sleep(10))   # a hang: the resolver's deadline must win
    proxy.set_fault(lambda req: DROP)              # close the connection without an answer
    proxy.set_fault(lambda req: DROP if req.sequence > 1 else None)  # a kept connection closed
    proxy.set_fault(only("secretsmanager", aws_error("ThrottlingException")))  # one service

KMS, Secrets Manager and SSM all speak the JSON protocol with an X-Amz-Target header, so one
proxy serves the three (moto serves them on one port). A fault callable receives the
ProxiedRequest and returns None to forward it unchanged, a Fault to answer instead of the
emulator, or DROP.

Every socket of the proxy has TCP_NODELAY, as a real endpoint's would: it writes an answer's
headers and body apart, and with Nagle's algorithm the body waits for the client's delayed ACK
of the headers (~40 ms on a kept-alive connection), which made the bench's Decrypt baseline and
every miss through the proxy jump from a few ms to ~46 ms now and then.

This proxy serves from threads of the test's own process. For a stand-in apart from it, as a
remote KMS is (the flood row of `make bench`), tests/support/kms_proxy_process.py runs one in a
process and session of its own.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "host", "content-length"}
)  # fmt: skip


# X-Amz-Target's prefix, per service.
SERVICES = {"TrentService": "kms", "secretsmanager": "secretsmanager", "AmazonSSM": "ssm"}


@dataclass(frozen=True)
class ProxiedRequest:
    """One request as the proxy saw it: the operation (e.g. `Decrypt`), headers, body."""

    method: str
    path: str
    operation: str
    headers: dict[str, str]
    body: bytes
    # 1 for the first request on its connection, 2 for the next one kept alive, and so on.
    sequence: int = 1

    @property
    def service(self) -> str:
        """`kms`, `secretsmanager` or `ssm` (from X-Amz-Target), `""` when unknown."""
        target = self.headers.get("X-Amz-Target") or self.headers.get("x-amz-target") or ""
        return SERVICES.get(target.partition(".")[0], "")


@dataclass(frozen=True)
class Fault:
    """An answer the proxy gives instead of forwarding."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(
        default_factory=lambda: {"Content-Type": "application/x-amz-json-1.1"}
    )
    # Announce this Content-Length instead of the body's, then close: a truncated answer.
    declared_length: int | None = None


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()
FaultHook = Callable[[ProxiedRequest], "Fault | _Drop | None"]


def kms_error(code: str, status: int = 400, message: str = "injected") -> Fault:
    """A KMS-style JSON error answer, e.g. kms_error("ThrottlingException", 400)."""
    body = f'{{"__type":"{code}","message":"{message}"}}'.encode()
    return Fault(status, body)


# Secrets Manager and SSM answer errors the same way (awsJson1.1).
aws_error = kms_error


def only(service: str, answer: Fault | _Drop) -> FaultHook:
    """A fault hook that answers `answer` to `service`'s requests and forwards the others."""
    return lambda request: answer if request.service == service else None


class KmsProxy:
    """Forwards to `upstream_url`, counting requests per KMS operation."""

    def __init__(self, upstream_url: str, host: str = "127.0.0.1", port: int = 0) -> None:
        parsed = urllib.parse.urlsplit(upstream_url)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._fault: FaultHook | None = None
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The proxy's endpoint URL, for the resolver's `endpoint_url`."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> KmsProxy:
        """Serve in a background thread; return self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="kms-proxy", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def count(self, operation: str | None = None) -> int:
        """Requests seen for `operation` (e.g. "Decrypt"), or in total when None."""
        with self._lock:
            if operation is None:
                return sum(self._counts.values())
            return self._counts[operation]

    def reset_counts(self) -> None:
        """Forget every count."""
        with self._lock:
            self._counts.clear()

    def set_fault(self, hook: FaultHook | None) -> None:
        """Install (or with None remove) the fault hook consulted for every request."""
        with self._lock:
            self._fault = hook

    def __enter__(self) -> KmsProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, request: ProxiedRequest) -> FaultHook | None:
        with self._lock:
            self._counts[request.operation] += 1
            return self._fault

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # TCP_NODELAY on each accepted connection
            sequence = 0  # requests seen on this connection (one handler per connection)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: test output must stay readable

            def do_GET(self) -> None:
                self._proxy()

            def do_POST(self) -> None:
                self._proxy()

            def _proxy(self) -> None:
                self.sequence += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                target = self.headers.get("X-Amz-Target", "")
                request = ProxiedRequest(
                    self.command,
                    self.path,
                    target.rpartition(".")[2],
                    {k: v for k, v in self.headers.items()},
                    body,
                    self.sequence,
                )
                hook = proxy._record(request)
                answer = hook(request) if hook is not None else None
                if answer is DROP:
                    self.close_connection = True
                    return
                if isinstance(answer, Fault):
                    self._answer(answer.status, answer.headers, answer.body, answer.declared_length)
                    return
                self._forward(request)

            def _forward(self, request: ProxiedRequest) -> None:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    conn.connect()
                    assert conn.sock is not None
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    headers = {
                        k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP
                    }
                    conn.request(request.method, request.path, body=request.body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    kept = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
                    self._answer(response.status, kept, data)
                except OSError:
                    # The emulator is down: answer like an unreachable upstream behind a gateway.
                    self._answer(502, {"Content-Type": "text/plain"}, b"upstream unreachable")
                finally:
                    conn.close()

            def _answer(
                self,
                status: int,
                headers: dict[str, str],
                body: bytes,
                declared_length: int | None = None,
            ) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                length = len(body) if declared_length is None else declared_length
                self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    self.wfile.write(body)
                    self.wfile.flush()
                except OSError:
                    # The resolver gave up (deadline) or was killed while the proxy answered.
                    self.close_connection = True
                if length != len(body):
                    self.close_connection = True

        return Handler
