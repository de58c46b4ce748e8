"""Can the calling process reach the EC2 instance metadata service (IMDS)? One quick TCP probe.

Used by `kmskeys doctor` (run as an app user, it should say "refused") and by
`kmskeys-resolver firewall status`. Stdlib only: no boto3, no HTTP, just a connect.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time

IMDS_IPV4 = "169.254.169.254"
IMDS_IPV6 = "fd00:ec2::254"
IMDS_ADDRESSES = (IMDS_IPV4, IMDS_IPV6)

# errno of a failed connect -> the word the report uses.
_DETAILS = {
    errno.ECONNREFUSED: "refused",
    errno.ECONNRESET: "refused",
    errno.ENETUNREACH: "unreachable",
    errno.EHOSTUNREACH: "unreachable",
    # A local firewall that drops (rather than rejects) in OUTPUT fails connect() with EPERM.
    errno.EPERM: "blocked",
    errno.EACCES: "blocked",
    errno.EADDRNOTAVAIL: "no route",
    errno.EAFNOSUPPORT: "no ipv6",
    errno.ETIMEDOUT: "timed out",
}


class ProbeResult:
    """One connect attempt: `reachable` is True only if the TCP handshake completed."""

    __slots__ = ("address", "detail", "port", "reachable")

    def __init__(self, address: str, port: int, reachable: bool, detail: str) -> None:
        self.address = address
        self.port = port
        self.reachable = reachable
        self.detail = detail

    @property
    def endpoint(self) -> str:
        """The address and port as a URL would write them, e.g. `[fd00:ec2::254]:80`."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form of this result."""
        return {
            "address": self.address,
            "port": self.port,
            "reachable": self.reachable,
            "detail": self.detail,
        }

    def __repr__(self) -> str:
        return f"ProbeResult({self.endpoint}, reachable={self.reachable}, {self.detail!r})"

    def __str__(self) -> str:
        return f"{self.endpoint} {self.detail}"


def _detail(err: int) -> str:
    return _DETAILS.get(err) or os.strerror(err).lower()


def probe(timeout: float = 0.5, port: int = 80) -> list[ProbeResult]:
    """TCP-connect to both IMDS endpoints at once; one result each, within about `timeout` s."""
    results: dict[str, ProbeResult] = {}
    pending: dict[str, socket.socket] = {}
    selector = selectors.DefaultSelector()
    try:
        for address in IMDS_ADDRESSES:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                results[address] = ProbeResult(address, port, False, _detail(exc.errno or 0))
                continue
            sock.setblocking(False)
            err = sock.connect_ex((address, port))
            if err in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                pending[address] = sock
                selector.register(sock, selectors.EVENT_WRITE, address)
                continue
            sock.close()
            ok = err == 0
            results[address] = ProbeResult(address, port, ok, "connected" if ok else _detail(err))
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in selector.select(remaining):
                address = key.data
                sock = pending.pop(address)
                selector.unregister(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                sock.close()
                ok = err == 0
                results[address] = ProbeResult(
                    address, port, ok, "connected" if ok else _detail(err)
                )
        for address in pending:
            results[address] = ProbeResult(address, port, False, "timed out")
    finally:
        for sock in pending.values():
            sock.close()
        selector.close()
    return [results[address] for address in IMDS_ADDRESSES]


def probe_as_user(uid: int, gid: int, timeout: float = 0.5) -> list[ProbeResult] | None:
    """`probe()` from a forked child that drops every id to uid/gid; None if it could not."""
    import json

    from kmskeys.upcall_probe import become_user

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 0
        try:
            os.close(read_fd)
            become_user(uid, gid)
            os.write(write_fd, json.dumps([r.as_dict() for r in probe(timeout)]).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return None
    return [
        ProbeResult(str(r["address"]), int(r["port"]), bool(r["reachable"]), str(r["detail"]))
        for r in json.loads(data)
    ]
