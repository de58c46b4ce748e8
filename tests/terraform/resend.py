"""A moto server whose answer to one request is lost after moto acted on it.

The request reaches moto through a proxy on 127.0.0.1; moto acts and answers, and the proxy
resets the client's connection instead of passing the first answer to OPERATION on. That is
what a loaded machine can do to any request (a 5xx does the same to the SDK): the provider's
SDK resends the request, and the resent create meets what the first one made. The terraform
tier's applies must survive it (tests/terraform/applied.py); test_resend.py checks they do.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support import terraform as tfsupport
from tests.support.kms_emulator import KmsEmulator
from tests.support.names import unique
from tests.terraform import applied
from tests.terraform.applied import Applied

# Headers the proxy sets itself: each answer is whole, and each connection serves one request.
HOP_BY_HOP = {"connection", "content-length", "transfer-encoding", "keep-alive"}


class LostAnswer(KmsEmulator):
    """moto behind a proxy that loses its first answer to OPERATION (an X-Amz-Target action)."""

    def __init__(self, operation: str, log: Path) -> None:
        super().__init__(log=log)
        self.operation = operation
        self.lost = threading.Event()
        self._proxy: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        port = self._proxy.server_address[1] if self._proxy else self.port
        return f"http://{self.host}:{port}"

    def start(self, timeout: float = 30.0) -> LostAnswer:
        super().start(timeout)
        if self._proxy is None:
            self._proxy = ThreadingHTTPServer((self.host, 0), self._handler())
            self._proxy.daemon_threads = True
            threading.Thread(target=self._proxy.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            proxy.shutdown()
            proxy.server_close()
        super().stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                upstream = http.client.HTTPConnection(emulator.host, emulator.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body, headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                action = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
                if action == emulator.operation and not emulator.lost.is_set():
                    emulator.lost.set()
                    # Linger 0: close() sends a reset, as a peer that went away does.
                    linger = struct.pack("ii", 1, 0)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in HOP_BY_HOP | {"server", "date"}:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: moto's own log has every request."""

        return Handler


# One Command document, created once by the provider.
CONTENT = {
    "schemaVersion": "2.2",
    "description": "kmskeys test: a document the provider creates once",
    "mainSteps": [
        {"action": "aws:runShellScript", "name": "noop", "inputs": {"runCommand": ["true"]}}
    ],
}


@dataclass
class ResendRun:
    """What one apply of a one-document root left, for tests/terraform/test_resend.py."""

    name: str
    here: Path
    started: list[KmsEmulator] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    run: Applied | None = None
    error: Exception | None = None

    def provider_log(self) -> str:
        return (self.here / applied.PROVIDER_LOG).read_text()


def document_root(here: Path, name: str) -> Path:
    """A root with one Command document named NAME."""
    here.mkdir()
    (here / "main.tf").write_text(
        'resource "aws_ssm_document" "this" {\n'
        f"  name          = {json.dumps(name)}\n"
        '  document_type = "Command"\n'
        f"  content       = {json.dumps(json.dumps(CONTENT))}\n"
        "}\n"
    )
    return here


def lost_answer_run(tf: tfsupport.Terraform, base: Path, stack: ExitStack) -> ResendRun:
    """Apply through a moto whose first answer to CreateDocument is lost (a session job of
    tests/terraform/conftest.py); its moto servers stop with `stack`."""
    out = ResendRun(unique("resend"), base / "resend-lost")

    def start() -> KmsEmulator:
        log = base / f"moto-resend-{len(out.started)}.log"
        first = not out.started
        moto = LostAnswer("CreateDocument", log) if first else KmsEmulator(log=log)
        out.started.append(moto)
        stack.callback(moto.stop)
        return moto.start()

    out.run = applied.apply(tf, document_root(out.here, out.name), start, {}, out.notes)
    return out


def taken_run(tf: tfsupport.Terraform, base: Path, stack: ExitStack) -> ResendRun:
    """Apply a document whose name someone else's document has: the error, never a retry."""
    out = ResendRun(unique("taken"), base / "resend-taken")
    taken = KmsEmulator(log=base / "moto-taken.log").start()
    stack.callback(taken.stop)
    out.started.append(taken)
    taken.client("ssm").create_document(
        Name=out.name, Content=json.dumps(CONTENT), DocumentType="Command"
    )
    try:
        out.run = applied.apply(tf, document_root(out.here, out.name), lambda: taken, {}, out.notes)
    except tfsupport.TerraformError as exc:
        out.error = exc
    return out
