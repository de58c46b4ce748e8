"""A real lighttpd on 127.0.0.1 and a free port, from a config template; stopped and cleaned up.

    with Lighttpd(EXAMPLE_CONF, workdir, docroot=www, python=sys.executable, prefix=p) as web:
        status, body = web.fetch("/secret.py")

The template is rendered with string.Template: `${port}`, `${workdir}`, `${errorlog}`,
`${cgilog}` (CGI stderr) and `${pidfile}` are filled in here, everything else comes from the
keyword arguments. lighttpd runs in the foreground (-D) in its own process group, so stop()
ends it and every CGI child with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import string
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.kms_emulator import free_port

EXAMPLE_CONF = Path(__file__).resolve().parents[2] / "examples" / "cgi" / "lighttpd.conf.in"


class LighttpdError(RuntimeError):
    """lighttpd is missing, refused its config, or did not come up."""


def lighttpd_binary() -> str:
    """The lighttpd executable, or LighttpdError saying how to install it."""
    found = shutil.which("lighttpd") or next(
        (p for p in ("/usr/sbin/lighttpd", "/sbin/lighttpd") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise LighttpdError("lighttpd is not installed: apt-get install lighttpd")
    return found


def http_get(url: str, timeout: float = 30.0) -> tuple[int, str]:
    """GET url; (status, body) for any HTTP answer, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def render(template: Path, **values: object) -> str:
    """The template with `${name}` replaced; a missing value is an error, not an empty string."""
    return string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})


class Lighttpd:
    """One lighttpd process serving `docroot` (a template value) on 127.0.0.1:port."""

    def __init__(self, template: Path, workdir: Path, **values: object) -> None:
        self.template = template
        self.workdir = workdir
        self.port = free_port()
        self.values = values
        self.config = workdir / "lighttpd.conf"
        self.errorlog = workdir / "lighttpd-error.log"
        self.cgilog = workdir / "cgi-stderr.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> Lighttpd:
        """Write the config, check it with `lighttpd -tt`, start and wait until it accepts."""
        binary = lighttpd_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            render(
                self.template,
                port=self.port,
                workdir=self.workdir,
                errorlog=self.errorlog,
                cgilog=self.cgilog,
                pidfile=self.workdir / "lighttpd.pid",
                **self.values,
            )
        )
        check = subprocess.run(
            [binary, "-tt", "-f", str(self.config)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise LighttpdError(f"lighttpd refused {self.config}: {check.stderr.strip()}")
        self._proc = subprocess.Popen(
            [binary, "-D", "-f", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise LighttpdError(f"lighttpd exited at start; see {self.errorlog}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise LighttpdError(f"lighttpd did not accept on port {self.port} within {timeout}s")

    def stop(self) -> None:
        """Stop lighttpd and its CGI children (its process group); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGINT is lighttpd's immediate shutdown (SIGTERM waits for running requests).
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def log(self) -> str:
        """The logs so far (lighttpd's errors, then CGI stderr), for failure messages."""
        text = ""
        for path in (self.errorlog, self.cgilog):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")[-4000:]
        return text

    def fetch(self, path: str, timeout: float = 30.0) -> tuple[int, str]:
        """GET path; (status, body) for any HTTP answer, errors included."""
        return http_get(self.url + path, timeout)

    def __enter__(self) -> Lighttpd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
