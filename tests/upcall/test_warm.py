"""The warm daemon: same answers as the cold path, faster, and trusted only between root ends."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmskeys.blob import parse_blob
from kmskeys.errors import KeyRejectedError, TemporarilyUnavailableError
from tests.support.kms_proxy import DROP, ProxiedRequest
from tests.support.names import unique
from tests.support.reach import reach_checkout
from tests.support.requester import NOBODY, as_user
from tests.support.warm_daemon import RESOLVER, warm_daemon

pytestmark = pytest.mark.upcall


@pytest.fixture
def warm_dir() -> Iterator[Path]:
    """A root-owned directory for the daemon's socket, like /run/kmskeys."""
    path = Path(tempfile.mkdtemp(prefix="kmst-warm-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def phases(line: str) -> set[str]:
    """The timing phases named in a resolver log line's t= field."""
    field = next(part for part in line.split() if part.startswith("t="))
    return {item.split(":")[0] for item in field[2:].split(",")}


def test_warm_daemon_serves_misses_and_cold_path_takes_over(
    extra_install: Any, warm_dir: Path
) -> None:
    sock = warm_dir / "run" / "resolver.sock"
    with extra_install(warm_socket=sock) as other:
        name, later = unique("warm"), unique("cold")
        with warm_daemon(other.config, sock) as proc:
            assert oct(os.stat(sock.parent).st_mode & 0o777) == "0o700"
            assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
            assert other.get(name, other.blob(b"warm-secret", name)) == b"warm-secret"
            line = other.log.wait_for(name)
            assert "outcome=ok" in line
            # Decrypted by the daemon: no botocore import or client build in the handler.
            assert {"warm", "d.decrypt"} <= phases(line)
            assert "import" not in phases(line)
            # The daemon refuses what the cold path refuses: KMS checks the name binding (of a
            # version-1 blob, which records no name for the handler to refuse first).
            stolen = unique("stolen")
            with pytest.raises(KeyRejectedError):
                other.get(stolen, parse_blob(other.blob(b"x", name)).identity())
            assert "InvalidCiphertextException" in other.log.wait_for(stolen)
            proc.terminate()
            proc.wait(timeout=10)
            assert not sock.exists(), "the daemon must remove its socket on SIGTERM"
        assert other.get(later, other.blob(b"cold-secret", later)) == b"cold-secret"
        assert {"cold", "import"} <= phases(other.log.wait_for(later))


def _ask(path: str) -> bytes:
    """Send a request; the answer's first bytes, or b"" when the daemon closed on us instead
    (EOF, reset or broken pipe: which one depends on timing, all mean no answer)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect(path)
    request = json.dumps({"v": 1, "blob": "x", "name": "n", "uid": 0, "gid": 0}).encode()
    try:
        conn.sendall(struct.pack("!I", len(request)) + request)
        return conn.recv(100)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def test_daemon_answers_root_only(extra_install: Any, warm_dir: Path) -> None:
    sock = warm_dir / "resolver.sock"
    # A real setuid child: the daemon judges its peer by SO_PEERCRED, which reports the euid,
    # so an fsuid stand-in would look like root there.
    with extra_install(warm_socket=sock) as other, warm_daemon(other.config, sock):
        assert as_user(NOBODY, lambda: _ask(str(sock)).hex(), mode="setuid") == {
            "error": "PermissionError",
            "errno": 13,
        }
        os.chmod(sock, 0o666)  # even if the socket's mode is loosened...
        assert as_user(NOBODY, lambda: _ask(str(sock)).hex(), mode="setuid") == {"ok": ""}
        assert _ask(str(sock)) != b""  # ...root still gets an answer


def _impostor(path: Path, ready: Any) -> None:
    # Bound as root (the directory is root's), but listening as nobody: SO_PEERCRED says 65534.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    reach_checkout()
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    server.listen(8)
    os.write(ready, b"x")
    while True:
        conn, _ = server.accept()
        poisoned = json.dumps({"ok": base64.b64encode(b"poisoned").decode()}).encode()
        conn.sendall(struct.pack("!I", len(poisoned)) + poisoned)
        conn.close()


def test_handler_never_believes_a_daemon_that_is_not_root(
    extra_install: Any, warm_dir: Path
) -> None:
    sock = warm_dir / "resolver.sock"
    with extra_install(warm_socket=sock) as other:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                _impostor(sock, write_end)
            finally:
                os._exit(0)
        try:
            os.read(read_end, 1)
            name = unique("poison")
            with pytest.raises(KeyRejectedError):
                other.get(name, other.blob(b"real", name))
            line = other.log.wait_for(name)
            assert "served by uid 65534, not root" in line
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(read_end)
            os.close(write_end)


def _hang_decrypt(request: ProxiedRequest) -> object:
    if request.operation == "Decrypt":
        time.sleep(30)
        return DROP
    return None


def test_kms_hanging_behind_the_daemon_is_unavailable_within_the_deadline(
    extra_install: Any, warm_dir: Path
) -> None:
    sock = warm_dir / "resolver.sock"
    with extra_install(warm_socket=sock, deadline=2) as other, warm_daemon(other.config, sock):
        assert other.proxy is not None
        name = unique("warmhang")
        text = other.blob(b"later", name)
        other.proxy.set_fault(_hang_decrypt)
        try:
            start = time.monotonic()
            with pytest.raises(TemporarilyUnavailableError):
                other.get(name, text)
            assert time.monotonic() - start < 2 + 1
        finally:
            other.proxy.set_fault(None)
        assert "outcome=unavailable" in other.log.wait_for(name)
        # EAGAIN is not cached, and the daemon is still serving.
        assert other.get(name, text) == b"later"


def test_daemon_dying_mid_request_is_unavailable_then_cold(
    extra_install: Any, warm_dir: Path
) -> None:
    sock = warm_dir / "resolver.sock"
    with extra_install(warm_socket=sock, deadline=3) as other:
        assert other.proxy is not None
        name = unique("warmdies")
        text = other.blob(b"survives", name)
        with warm_daemon(other.config, sock) as proc:
            arrived = threading.Event()

            def stall(request: ProxiedRequest) -> object:
                if request.operation != "Decrypt":
                    return None
                arrived.set()
                time.sleep(30)
                return DROP

            other.proxy.set_fault(stall)
            outcome: list[object] = []
            caller = threading.Thread(target=lambda: outcome.append(_try(other, name, text)))
            caller.start()
            try:
                assert arrived.wait(5), "the daemon never called KMS"
                proc.kill()  # SIGKILL mid-request: the handler's connection breaks
                caller.join(timeout=5)
            finally:
                other.proxy.set_fault(None)
        assert [type(o) for o in outcome] == [TemporarilyUnavailableError], outcome
        assert "warm daemon failed" in other.log.wait_for(name)
        # The daemon's socket is left behind, refusing connections: the handler goes cold.
        assert other.get(name, text) == b"survives"
        assert "cold" in phases(other.log.wait_for(name))


def _try(install: Any, name: str, text: str) -> object:
    try:
        return install.get(name, text)
    except Exception as exc:
        return exc


def test_doctor_reports_the_warm_daemon(extra_install: Any, warm_dir: Path) -> None:
    sock = warm_dir / "resolver.sock"
    # In a network namespace of its own: doctor probes IMDS.
    doctor = ["unshare", "--net", str(RESOLVER.with_name("kmskeys")), "doctor"]
    with extra_install(warm_socket=sock) as other:
        args = [*doctor, "--prefix", other.prefix, "--config", str(other.config)]
        idle = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
        assert f"warn warm_socket {sock} set but no daemon answers" in idle.stdout
        with warm_daemon(other.config, sock):
            up = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
        assert f"ok   warm daemon answering on {sock}" in up.stdout
    with extra_install() as cold:
        args = [*doctor, "--prefix", cold.prefix, "--config", str(cold.config)]
        off = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
        assert "info warm daemon off" in off.stdout
