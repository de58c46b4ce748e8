"""A stand-in IMDS for the netns tests: HTTP on each ADDRESS:PORT given, `ready` once listening.

Run as root inside the test's network namespace: `python imds_server.py 169.254.169.254:80 ...`.
"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = b"kmst-imds\n"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests read stdout for `ready` only."""


class _Server(ThreadingHTTPServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves its own name (getfqdn): with a default route and no
        # DNS in the namespace, that waits seconds for a resolver timeout.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "kmst-imds", self.server_address[1]


class _Server6(_Server):
    address_family = socket.AF_INET6


def main(argv: list[str]) -> int:
    """Serve every `ADDRESS:PORT` in argv until killed."""
    for spec in argv:
        host, _, port = spec.rpartition(":")
        host = host.strip("[]")
        cls = _Server6 if ":" in host else _Server
        server = cls((host, int(port)), _Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
