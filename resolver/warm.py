"""The warm path: `kmskeys-resolver serve` keeps a KMS client loaded for the handler.

A cold handler spends most of a miss importing botocore and building a client (about 100 ms of
150, docs/resolver.md). The daemon pays that once. The handler, still run by request-key for
every miss, sends it the request over a root-only unix socket and gets back the plaintext or a
failure class. The daemon decrypts with the same operation through the same gateway
(resolver/kms.py, resolver/gateway.py), spending the requester's budget, so what decrypts and
what is refused are the same as on the cold path; the handler has applied the key allowlist
already, and the daemon, a separate process, applies it to what it is asked. When no daemon
answers, the handler decrypts by itself.

Trust runs both ways and is checked by the kernel's peer credentials (SO_PEERCRED): the daemon
serves only uid 0, and the handler believes only a daemon running as uid 0 whose socket sits in
a root-owned directory. Otherwise a local user could poison the cache with a fake plaintext.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmskeys import fileio
from kmskeys.blob import Blob, BlobFormatError, parse_blob
from kmskeys.errors import InvalidNameError
from kmskeys.lowlevel.process import disable_core_dumps
from kmskeys.names import validate_name
from kmskeys.trust import peer_uid
from resolver.awsclient import SessionClients
from resolver.backend import Context, Request, Timings
from resolver.config import Config
from resolver.errors import (
    ConfigError,
    RefusedError,
    ResolverError,
    ServiceUnavailableError,
    UnavailableError,
    UnknownSecretError,
    failure,
)
from resolver.gateway import Authorized, Gateway
from resolver.kms import BlobDecrypt, open_blob
from resolver.limits import UidBudget

PROTOCOL = 1
_HEADER = struct.Struct("!I")
MAX_REQUEST = 128 * 1024  # a 64 KiB blob plus the request's fields
MAX_RESPONSE = 64 * 1024  # a 32767-byte payload, base64-encoded, plus the fields
_ERRORS: dict[str, type[ResolverError]] = {
    "unknown": UnknownSecretError,
    "refused": RefusedError,
    "unavailable": UnavailableError,
}


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    """Write one length-prefixed JSON message."""
    data = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_message(sock: socket.socket, limit: int) -> dict[str, Any]:
    """Read one length-prefixed JSON message of at most `limit` bytes."""
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if size > limit:
        raise ValueError(f"message of {size} bytes is over {limit}")
    message = json.loads(_recv_exactly(sock, size))
    if not isinstance(message, dict):
        raise ValueError("message is not a JSON object")
    return message


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionError("connection closed mid-message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class WarmDecrypter:
    """Decrypts through the warm daemon; decrypts in this process when none is running."""

    def __init__(self, config: Config, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway

    def decrypt(self, authorized: Authorized[bytes], request: Request, context: Context) -> bytes:
        """Ask the daemon; on no daemon (absent or refusing connections) go cold."""
        start = time.perf_counter()
        timings, deadline = context.timings, context.deadline
        sock = self._connect(deadline)
        if sock is None:
            timings.add("cold", 0.0)
            return open_blob(self.gateway, authorized, context.budget, deadline, timings)
        op = authorized.operation
        assert isinstance(op, BlobDecrypt)
        with sock:
            answer = self._exchange(sock, op.blob, request, deadline)
        timings.add("warm", (time.perf_counter() - start) * 1000)
        for phase, ms in (answer.get("t") or {}).items():
            timings.add(f"d.{phase}", float(ms))
        if "ok" in answer:
            return base64.b64decode(answer["ok"], validate=True)
        error = _ERRORS.get(str(answer.get("error")), RefusedError)
        if error is UnavailableError and answer.get("kms") is True:
            error = ServiceUnavailableError  # KMS itself is unavailable: a stale entry may answer
        raise error(f"warm daemon: {answer.get('reason', 'no reason given')}")

    def _exchange(
        self, sock: socket.socket, blob: Blob, request: Request, deadline: float
    ) -> dict[str, Any]:
        message = {
            "v": PROTOCOL,
            "blob": blob.to_text(),
            "name": request.name,
            "uid": request.uid,
            "gid": request.gid,
            "user": request.user,
            "unit": request.unit,
            "timeout": max(0.0, deadline - time.monotonic()),
        }
        try:
            send_message(sock, message)
            return recv_message(sock, MAX_RESPONSE)
        except TimeoutError:
            raise ServiceUnavailableError(
                "warm daemon did not answer before the deadline"
            ) from None
        except (OSError, ValueError) as exc:
            raise ServiceUnavailableError(f"warm daemon failed: {type(exc).__name__}") from None

    def _connect(self, deadline: float) -> socket.socket | None:
        path = self.config.warm_socket
        assert path is not None  # BlobBackend picks this decrypter only when it is set
        try:
            # The daemon's directory and socket must be root's: a daemon run by anyone else
            # could answer with any plaintext.
            parent = f"warm_socket directory {path.parent}"
            fileio.check_path(path.parent, parent, fileio.DIRECTORY, fileio.FOLLOW)
            fileio.check_path(path, f"warm_socket {path}", fileio.SOCKET)
        except fileio.UntrustedFileError as exc:
            if exc.problem == fileio.MISSING:
                return None  # no daemon running: the cold path is the normal fallback
            raise RefusedError(str(exc)) from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            sock.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            return None  # a stale socket from a daemon that is gone
        except OSError as exc:
            sock.close()
            raise UnavailableError(f"warm_socket {path}: {exc.strerror}") from None
        uid = peer_uid(sock)
        if uid != 0:
            sock.close()
            # A daemon not run by root could answer with any plaintext: never believe it.
            raise RefusedError(f"warm_socket {path} is served by uid {uid}, not root")
        return sock


class CachedClients(SessionClients):
    """One client per (service, region) for a process's lifetime: the warm daemon's."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], Any] = {}

    def client(self, service: str, region: str, deadline: float, timings: Timings) -> Any:
        """The process's client, built on first use."""
        with self._lock:
            found = self._clients.get((service, region))
            if found is None:
                # Timeouts sized for a whole handler deadline, not for what is left of the
                # request that happens to build the client.
                whole = time.monotonic() + self.config.deadline
                found = super().client(service, region, whole, timings)
                self._clients[(service, region)] = found
            return found


class Daemon:
    """The warm daemon's socket and request loop."""

    def __init__(self, config: Config) -> None:
        if config.warm_socket is None:
            raise ConfigError(f"config {config.path}: set warm_socket to run the warm daemon")
        self.config = config
        self.path: Path = config.warm_socket
        # One client per region for the daemon's lifetime: the point of the daemon.
        self.gateway = Gateway(config, CachedClients(config))
        self.listener: socket.socket | None = None
        self._inode: int | None = None

    def bind(self) -> None:
        """Create the root-only socket, replacing a stale one atomically."""
        parent = self.path.parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            label = f"warm_socket directory {parent}"
            fileio.check_path(parent, label, fileio.DIRECTORY, fileio.FOLLOW)
        except fileio.UntrustedFileError as exc:
            raise ConfigError(str(exc), refusal=exc) from None
        temp = parent / f".{self.path.name}.{os.getpid()}"
        temp.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            listener.bind(os.fspath(temp))
        finally:
            os.umask(old_umask)
        listener.listen(128)
        os.replace(temp, self.path)
        self._inode = os.lstat(self.path).st_ino
        self.listener = listener

    def serve_forever(self) -> None:
        """Accept connections until the listener is closed."""
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed by shutdown()
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def shutdown(self) -> None:
        """Stop accepting and remove our socket (never a newer daemon's)."""
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        try:
            if os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def _serve_one(self, conn: socket.socket) -> None:
        with conn:
            if peer_uid(conn) != 0:
                return  # only the root handler may ask: close without a word
            conn.settimeout(self.config.deadline + 1.0)
            try:
                request = recv_message(conn, MAX_REQUEST)
                answer = self.answer(request)
                send_message(conn, answer)
            except (OSError, ValueError):
                return  # a broken client gets nothing; the handler then reports unavailable

    def answer(self, message: dict[str, Any]) -> dict[str, Any]:
        """Decrypt one request; the answer carries the plaintext or the failure class."""
        timings = Timings()
        try:
            blob, request, timeout = self._parse(message)
            deadline = time.monotonic() + timeout
            # Its own allowlist check (this process was asked, not the handler's), and the
            # requester's budget: the call is the requester's.
            authorized = self.gateway.authorize(BlobDecrypt(blob, request))
            budget = UidBudget(self.config, request.uid)
            plaintext = open_blob(self.gateway, authorized, budget, deadline, timings)
        except ResolverError as exc:
            answer: dict[str, Any] = {
                "error": exc.outcome,
                "reason": exc.reason,
                "t": timings.phases,
            }
            if isinstance(exc, ServiceUnavailableError):
                answer["kms"] = True
            return answer
        except Exception as exc:  # classified as the handler classifies it
            error = failure(exc)
            return {"error": error.outcome, "reason": error.reason}
        return {"ok": base64.b64encode(plaintext).decode(), "t": timings.phases}

    def _parse(self, message: dict[str, Any]) -> tuple[Blob, Request, float]:
        if message.get("v") != PROTOCOL:
            raise RefusedError(f"warm protocol {message.get('v')!r} is not {PROTOCOL}")
        try:
            name = validate_name(str(message["name"]))
            blob = parse_blob(str(message["blob"]), allow_legacy=self.config.allow_legacy_blobs)
            user, unit = message.get("user"), message.get("unit")
            request = Request(
                prefix=self.config.prefix,
                name=name,
                uid=int(message["uid"]),
                gid=int(message["gid"]),
                user=None if user is None else str(user),
                # The handler read it from the requester's cgroup; KMS binds the blob to it.
                unit=None if unit is None else str(unit),
            )
            timeout = min(float(message["timeout"]), self.config.deadline)
        except (KeyError, TypeError, ValueError, InvalidNameError, BlobFormatError) as exc:
            raise RefusedError(f"malformed warm request: {type(exc).__name__}") from None
        return blob, request, max(0.0, timeout)


def serve(config: Config, ready: Callable[[], None] | None = None) -> int:
    """Run the warm daemon until SIGTERM or SIGINT."""
    # It holds every plaintext it serves for a moment: no core file may ever hold them.
    disable_core_dumps()
    daemon = Daemon(config)
    daemon.bind()

    def stop(signum: int, _frame: object) -> None:
        daemon.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"kmskeys-resolver serve: listening on {daemon.path}", file=sys.stderr, flush=True)
    if ready is not None:
        ready()
    try:
        daemon.serve_forever()
    finally:
        daemon.shutdown()
    return 0
