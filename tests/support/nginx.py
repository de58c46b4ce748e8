"""A real nginx in front of a real fcgiwrap, both on 127.0.0.1 and free ports; cleaned up.

    with NginxFcgiwrap(NGINX_CONF, workdir, script=www / "secret.py", docroot=www,
                       prefix=p, secret="db-password") as web:
        status, body = web.fetch("/secret.py")

fcgiwrap forks the CGI script for every request, so the script runs in fcgiwrap's session
keyring: fcgiwrap is started by the caller's process (it inherits the caller's session
keyring), nginx in a new anonymous session keyring of its own, to show that nginx's keyring
plays no part. fcgiwrap gets an empty environment (it hands its own environment to the
scripts, on top of the FastCGI params) and may run `script` only (`-p`). Both run in their own
process groups; stop() ends them and every CGI child.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.kms_emulator import free_port
from tests.support.lighttpd import http_get, render

NGINX_CONF = Path(__file__).resolve().parents[2] / "examples" / "cgi" / "nginx.conf.in"
# The template includes it; Debian ships it in nginx-common.
FASTCGI_PARAMS = Path("/etc/nginx/fastcgi_params")


class NginxError(RuntimeError):
    """nginx or fcgiwrap is missing, refused its config, or did not come up."""


def binary(name: str) -> str:
    """The executable `name`, or NginxError saying how to install it."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise NginxError(f"{name} is not installed: apt-get install {name} (make deps)")
    return found


def _wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NginxError(f"{what} exited at start with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise NginxError(f"{what} did not accept on port {port} within {timeout}s")


def _stop(proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class NginxFcgiwrap:
    """nginx on 127.0.0.1:port passing `script` to fcgiwrap on 127.0.0.1:fcgi_port."""

    def __init__(self, template: Path, workdir: Path, script: Path, **values: object) -> None:
        self.template = template
        self.workdir = workdir
        self.script = script
        self.values = values
        self.port = free_port()
        self.fcgi_port = free_port()
        self.config = workdir / "nginx.conf"
        self.errorlog = workdir / "nginx-error.log"
        self.nginx: subprocess.Popen[bytes] | None = None
        self.fcgiwrap: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NginxFcgiwrap:
        """Start fcgiwrap, write and check nginx's config, start nginx, wait for both."""
        nginx, fcgiwrap = binary("nginx"), binary("fcgiwrap")
        if not FASTCGI_PARAMS.is_file():
            raise NginxError(f"{FASTCGI_PARAMS} is missing: apt-get install nginx-common")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            render(
                self.template,
                port=self.port,
                errorlog=self.errorlog,
                pidfile=self.workdir / "nginx.pid",
                fcgi=f"127.0.0.1:{self.fcgi_port}",
                **self.values,
            )
        )
        # -e: nginx's own log before it has read the config, kept out of /var/log/nginx.
        early = ["-e", str(self.workdir / "nginx-early.log"), "-c", str(self.config)]
        check = subprocess.run([nginx, "-t", *early], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise NginxError(f"nginx refused {self.config}: {check.stderr.strip()}")
        try:
            self.fcgiwrap = subprocess.Popen(
                [fcgiwrap, "-f", "-s", f"tcp:127.0.0.1:{self.fcgi_port}", "-p", str(self.script)],
                env={},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            _wait_listening(self.fcgiwrap, self.fcgi_port, "fcgiwrap", timeout)
            # `keyctl session -`: a new anonymous session keyring for nginx alone.
            self.nginx = subprocess.Popen(
                ["keyctl", "session", "-", nginx, *early, "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            _wait_listening(self.nginx, self.port, "nginx", timeout)
        except BaseException as exc:
            log = self.log()
            self.stop()
            if isinstance(exc, NginxError):
                raise NginxError(f"{exc}; {log}") from None
            raise
        return self

    def stop(self) -> None:
        """Stop nginx, then fcgiwrap and its CGI children; idempotent."""
        nginx, self.nginx = self.nginx, None
        fcgiwrap, self.fcgiwrap = self.fcgiwrap, None
        _stop(nginx, signal.SIGINT)  # SIGINT/SIGTERM: nginx's fast shutdown
        _stop(fcgiwrap, signal.SIGTERM)

    def log(self) -> str:
        """nginx's error log so far (CGI stderr goes there through fcgiwrap -f)."""
        text = ""
        for path in (self.workdir / "nginx-early.log", self.errorlog):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")[-4000:]
        return text

    def fetch(self, path: str, timeout: float = 30.0) -> tuple[int, str]:
        """GET path; (status, body) for any HTTP answer, errors included."""
        return http_get(self.url + path, timeout)

    def __enter__(self) -> NginxFcgiwrap:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
