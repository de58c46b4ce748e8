"""The upcall harness: a real resolver install under a unique prefix, and its syslog socket.

Shared by the upcall tests (through conftest.py) and the miss benchmark (tests/bench/miss.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmskeys import KmsKeysError, get_secret
from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.leftover_keys import flush_install
from tests.support.names import unique, unique_prefix
from tests.support.ttl import MIN_TTL

RESOLVER = Path(sys.executable).parent / "kmskeys-resolver"
KMSKEYS = Path(sys.executable).parent / "kmskeys"
# `KMSKEYS_TEST_DAEMON=1`: every install runs the resolver daemon (`kmskeys-resolver serve`),
# so that a tier runs its misses through the gate and the daemon instead of the handler.
DAEMON_ENV = "KMSKEYS_TEST_DAEMON"
# Names matching this glob get a short ttl in the session config (the ttl expiry test).
SHORT_TTL_GLOB = "kmst-*-shortttl-*"
SHORT_TTL = MIN_TTL
# Names matching this glob may be resolved only by `nobody` (the allow_users policy test).
NOBODY_ONLY_GLOB = "kmst-*-nobodyonly-*"


class SyslogReader:
    """A unix datagram socket standing in for /dev/log; collects the resolver's lines.

    A thread receives continuously: the kernel queues only net.unix.max_dgram_qlen (10 by
    default) datagrams per socket, and the resolver's non-blocking send drops a line (to its
    stderr, which request-key discards) when that queue is full.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.fspath(path))
        self.sock.settimeout(0.1)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._last = time.monotonic()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="syslog-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closing:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return  # closed
            with self._changed:
                self.lines.append(data.decode("utf-8", "replace"))
                self._last = time.monotonic()
                self._changed.notify_all()

    def collect(self, timeout: float = 1.0) -> None:
        """Wait up to `timeout` for at least one line to be pending."""
        with self._changed:
            self._changed.wait_for(lambda: bool(self.lines), timeout)

    def drain(self) -> list[str]:
        """Every line received so far (waiting a moment for stragglers), then forget them."""
        with self._changed:
            quiet_until = time.monotonic() + 0.05
            while (left := max(quiet_until, self._last + 0.05) - time.monotonic()) > 0:
                self._changed.wait(left)
            lines, self.lines = self.lines, []
        return lines

    def wait_for(self, name: str, timeout: float = 15.0) -> str:
        """The first line about secret `name`; the resolver logs after answering the kernel."""
        needle = f" name={name} "

        def find() -> str | None:
            return next((line for line in self.lines if needle in line + " "), None)

        with self._changed:
            if self._changed.wait_for(lambda: find() is not None, timeout):
                line = find()
                assert line is not None
                self.lines.remove(line)
                return line
            raise AssertionError(f"no resolver log line for {name!r}; got {self.lines!r}")

    def close(self) -> None:
        self._closing = True
        self._thread.join(timeout=5)
        self.sock.close()


@dataclass
class Install:
    """One installed resolver: its prefix, config, blob_dir, KMS key and log."""

    root: Path
    prefix: str
    config: Path
    blob_dir: Path
    emulator: KmsEmulator
    proxy: KmsProxy | None
    key_arn: str
    log: SyslogReader
    settings: dict[str, Any] = field(default_factory=dict)
    # The resolver daemon serving this install's misses, when one runs (`installed(daemon=)`).
    daemon: subprocess.Popen[bytes] | None = None

    def kms(self) -> Any:
        """A boto3 KMS client on the emulator (test side, not the resolver's)."""
        return self.emulator.client()

    def blob(self, plaintext: bytes, name: str, **options: Any) -> str:
        """A blob for `name` made by the encryptor library."""
        import encryptor

        return str(
            encryptor.encrypt(plaintext, name, self.key_arn, client=self.kms(), **options).to_text()
        )

    def deploy(self, name: str, text: str | bytes, mode: int = 0o644) -> Path:
        """Write blob_dir/NAME.kms, root-owned, creating sub-directories as needed."""
        path = self.blob_dir / f"{name}.kms"
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        os.chmod(path, mode)
        return path

    def get(self, name: str, blob: str | bytes | None = None) -> bytes:
        """get_secret(name) under this install's prefix: through the real upcall on a miss."""
        return get_secret(name, blob, prefix=self.prefix)

    def description(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def decrypts(self) -> int:
        """KMS Decrypt calls the proxy has forwarded (or answered) since the last reset."""
        assert self.proxy is not None
        return self.proxy.count("Decrypt")


@contextmanager
def kms_stack() -> Iterator[tuple[KmsEmulator, KmsProxy, str]]:
    """A moto server, the counting proxy in front of it, and one KMS key ARN; stopped after."""
    emulator = KmsEmulator().start()
    proxy = KmsProxy(emulator.url).start()
    try:
        key = emulator.client().create_key(Description="kmst resolver tests")["KeyMetadata"]
        yield emulator, proxy, key["Arn"]
    finally:
        proxy.stop()
        emulator.stop()


@contextmanager
def fresh(install: Install) -> Iterator[Install]:
    """A shared install for one test: no fault, counts and log lines reset; no fault after."""
    proxy = install.proxy
    assert proxy is not None
    proxy.set_fault(None)
    proxy.reset_counts()
    install.log.drain()
    try:
        yield install
    finally:
        proxy.set_fault(None)


def _pids(match: Callable[[list[bytes]], bool]) -> list[int]:
    """Pids of the running processes whose argv `match` accepts."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if match(argv):
            pids.append(int(entry.name))
    return pids


def handler_pids(config: Path) -> list[int]:
    """Pids of running `kmskeys-resolver handle` processes of the install using `config`."""
    return _pids(lambda argv: b"handle" in argv and os.fsencode(config) in argv)


def gate_pids(install: Install) -> list[int]:
    """Pids of the install's running `kmskeys-gate` processes (the daemon's upcalls)."""
    state = os.fsencode(install.settings["state_dir"])
    return _pids(lambda argv: argv[0].endswith(b"kmskeys-gate") and state in argv)


def flood(install: Install, names: list[str], blobs: dict[str, str]) -> dict[str, int]:
    """Every name requested at once, a thread each: how many requests ended how (`ok`, or the
    error class's name)."""
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def one(name: str) -> None:
        try:
            get_secret(name, blobs[name], prefix=install.prefix)
            what = "ok"
        except KmsKeysError as exc:
            what = type(exc).__name__
        with lock:
            outcomes[what] = outcomes.get(what, 0) + 1

    threads = [threading.Thread(target=one, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def worker_pids(config: Path) -> list[int]:
    """Pids of the handler workers (the supervised children) of the install using `config`."""
    handlers = set(handler_pids(config))
    workers = []
    for pid in handlers:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(
            next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
        )
        if ppid in handlers:
            workers.append(pid)
    return workers


def _write_root_file(path: Path, text: str, mode: int) -> None:
    path.write_text(text)
    os.chown(path, 0, 0)
    os.chmod(path, mode)


def _toml_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    return str(value)


def run_resolver(*args: str, resolver: Path = RESOLVER) -> subprocess.CompletedProcess[str]:
    """Run the installed kmskeys-resolver console script (default: this venv's)."""
    return subprocess.run(
        [str(resolver), *args], check=False, capture_output=True, text=True, timeout=60
    )


@contextmanager
def installed(
    emulator: KmsEmulator,
    proxy: KmsProxy | None,
    key_arn: str,
    names: str = "",
    resolver: Path = RESOLVER,
    *,
    daemon: bool | None = None,
    **settings: Any,
) -> Iterator[Install]:
    """Install a resolver under a fresh prefix with `settings` in its config; remove it after.

    `resolver` is the kmskeys-resolver that installs itself: the rule runs that one. `daemon`
    runs the resolver daemon on a socket of the install's own (default: DAEMON_ENV says).
    """
    if daemon is None:
        daemon = os.environ.get(DAEMON_ENV) == "1"
    root = Path(tempfile.mkdtemp(prefix=unique("resolver") + "-"))
    os.chmod(root, 0o755)
    if daemon:
        settings.setdefault("warm_socket", root / "run" / "resolver.sock")
    prefix = unique_prefix()
    blob_dir = root / "blobs"
    blob_dir.mkdir(mode=0o755)
    credentials = root / "credentials"
    _write_root_file(
        credentials,
        "[default]\n"
        f"aws_access_key_id = {TEST_CREDENTIALS['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {TEST_CREDENTIALS['AWS_SECRET_ACCESS_KEY']}\n",
        0o600,
    )
    log = SyslogReader(root / "log.sock")
    values: dict[str, Any] = {
        "region": TEST_CREDENTIALS["AWS_REGION"],
        "key_arns": [key_arn],
        "endpoint_url": proxy.url if proxy is not None else emulator.url,
        "shared_credentials_file": credentials,
        "blob_dir": blob_dir,
        "state_dir": root / "state",
        "prefix": prefix,
        "syslog_socket": log.path,
        "deadline": 4,
        "negative_ttl": MIN_TTL,
        **settings,
    }
    config = root / "resolver.toml"
    body = "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
    _write_root_file(config, body + names, 0o644)
    done = run_resolver("install", "--config", str(config), "--prefix", prefix, resolver=resolver)
    assert done.returncode == 0, done.stderr
    try:
        with ExitStack() as stack:
            served = None
            if daemon:
                from tests.support.resolver_daemon import resolver_daemon

                sock = Path(values["warm_socket"])
                served = stack.enter_context(resolver_daemon(config, sock, resolver))
            yield Install(
                root, prefix, config, blob_dir, emulator, proxy, key_arn, log, values, served
            )
    finally:
        undone = run_resolver(
            "uninstall", "--config", str(config), "--prefix", prefix, resolver=resolver
        )
        flush_install(values)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        assert undone.returncode == 0, undone.stderr
