"""The counting proxy in a process and a session of its own, as a remote KMS is to its clients.

    with KmsEmulator() as emulator, KmsProxyProcess(emulator.url) as proxy:
        ... point the resolver's endpoint_url at proxy.url ...
        proxy.hold("Decrypt", "kmst-flood", 2.0)  # hold each Decrypt whose body holds the marker
        proxy.count("Decrypt")
        proxy.reset_counts()
        proxy.hold(None)                          # forward everything again

KmsProxy (tests/support/kms_proxy.py) serves from threads of the test's own process, which is
what most tests want: any fault hook, in one line. A bench row that measures a host under load
wants the KMS stand-in apart from the client it measures, as a real KMS is on a machine of its
own: a proxy holding 200 calls in threads of the bench's process shares that process's
interpreter (its GIL) and that session's scheduler weight (autogroups, sched(7)) with root's
client, and took up to 152 ms to accept root's next connection. Here the same KmsProxy
(TCP_NODELAY and all) runs in `python -m tests.support.kms_proxy_process --upstream URL`,
started in a new session (moto, behind it, already runs in one of its own: KmsEmulator).

What the proxy does is limited to what such a row needs: forward, count, and hold the calls of
one operation whose body holds a marker (a hook cannot cross a process boundary). The parent
controls it over the child's stdin and stdout, one JSON object a line, so nothing else on the
host can (no control port another local user could reach, nothing the proxied requests could
hit). The child prints {"url": ...} once it serves, and stops at the end of its stdin, so it
never outlives the process that started it.
"""

from __future__ import annotations

import argparse
import json
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.kms_proxy import KmsProxy, ProxiedRequest

ROOT = Path(__file__).resolve().parents[2]


class KmsProxyProcess:
    """A KmsProxy forwarding to `upstream_url`, run by a child process in its own session."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self._proc: subprocess.Popen[str] | None = None
        self._url = ""
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The proxy's endpoint URL, for the resolver's `endpoint_url`."""
        if not self._url:
            raise RuntimeError("the KMS proxy process is not started")
        return self._url

    @property
    def pid(self) -> int:
        """The child's pid (it leads its own session)."""
        if self._proc is None:
            raise RuntimeError("the KMS proxy process is not started")
        return self._proc.pid

    def start(self, timeout: float = 30.0) -> KmsProxyProcess:
        """Start the child and wait until it serves; return self."""
        if self._proc is not None:
            return self
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, "--upstream", self.upstream_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            self._url = str(self._answer(timeout)["url"])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """End the child's stdin (it stops serving and exits); kill it if it does not."""
        proc, self._proc, self._url = self._proc, None, ""
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.close()
        except OSError:
            pass  # it exited already
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            assert proc.stdout is not None
            proc.stdout.close()

    def count(self, operation: str | None = None) -> int:
        """Requests seen for `operation` (e.g. "Decrypt"), or in total when None."""
        return int(self._ask({"op": "count", "operation": operation})["count"])

    def reset_counts(self) -> None:
        """Forget every count."""
        self._ask({"op": "reset"})

    def hold(self, operation: str | None, marker: str = "", seconds: float = 0.0) -> None:
        """Hold for `seconds` each `operation` request whose body contains `marker`, then
        forward it; with None, forward everything at once."""
        self._ask({"op": "hold", "operation": operation, "marker": marker, "seconds": seconds})

    def __enter__(self) -> KmsProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ask(self, command: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._proc is None or self._proc.stdin is None:
                raise RuntimeError("the KMS proxy process is not started")
            try:
                self._proc.stdin.write(json.dumps(command) + "\n")
                self._proc.stdin.flush()
            except OSError as exc:
                raise RuntimeError(f"the KMS proxy process is gone: {exc}") from None
            return self._answer(10.0)

    def _answer(self, timeout: float) -> dict[str, Any]:
        """The child's next line, within `timeout` seconds."""
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            code = self._proc.poll()
            state = "did not answer" if code is None else f"exited with {code}"
            raise RuntimeError(f"the KMS proxy process {state} within {timeout:.0f} s")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the KMS proxy process refused a command: {answer['error']}")
        return answer


class _Hold:
    """The child's hold rule: (operation, marker in the body, seconds), or None."""

    def __init__(self) -> None:
        self.rule: tuple[str, bytes, float] | None = None  # replaced whole, never edited

    def __call__(self, request: ProxiedRequest) -> None:
        rule = self.rule
        if rule is not None and request.operation == rule[0] and rule[1] in request.body:
            time.sleep(rule[2])


def _obey(proxy: KmsProxy, hold: _Hold, command: dict[str, Any]) -> dict[str, Any]:
    """Carry out one command from the parent; the answer to print."""
    op = command.get("op")
    if op == "count":
        operation = command.get("operation")
        return {"count": proxy.count(operation if isinstance(operation, str) else None)}
    if op == "reset":
        proxy.reset_counts()
        return {"ok": True}
    if op == "hold":
        operation, marker, seconds = (command.get(k) for k in ("operation", "marker", "seconds"))
        if operation is not None and not isinstance(operation, str):
            return {"error": "operation must be a string or null"}
        if not isinstance(marker, str) or not isinstance(seconds, int | float) or seconds < 0:
            return {"error": "marker must be a string and seconds a number >= 0"}
        hold.rule = None if operation is None else (operation, marker.encode(), float(seconds))
        return {"ok": True}
    return {"error": f"unknown command {op!r}"}


def _say(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Serve a KmsProxy in front of --upstream until stdin ends, obeying its commands."""
    parser = argparse.ArgumentParser(description="The counting KMS proxy, in a process.")
    parser.add_argument("--upstream", required=True, help="the emulator's URL")
    args = parser.parse_args(argv)
    hold = _Hold()
    proxy = KmsProxy(args.upstream)
    proxy.set_fault(hold)
    proxy.start()
    try:
        _say({"url": proxy.url})
        for line in sys.stdin:
            try:
                command = json.loads(line)
            except json.JSONDecodeError:
                _say({"error": "not a JSON line"})
                continue
            _say(_obey(proxy, hold, command) if isinstance(command, dict) else {"error": "?"})
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
