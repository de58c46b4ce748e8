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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmskeys import get_secret
from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.names import unique, unique_prefix

RESOLVER = Path(sys.executable).parent / "kmskeys-resolver"
KMSKEYS = Path(sys.executable).parent / "kmskeys"
# Names matching this glob get a 2 s ttl in the session config (the ttl expiry test).
SHORT_TTL_GLOB = "kmst-*-shortttl-*"
SHORT_TTL = 2
# Names matching this glob may be resolved only by `nobody` (the allow_users policy test).
NOBODY_ONLY_GLOB = "kmst-*-nobodyonly-*"


class SyslogReader:
    """A unix datagram socket standing in for /dev/log; collects the resolver's lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.fspath(path))
        self.lines: list[str] = []

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return False
        self.lines.append(data.decode("utf-8", "replace"))
        return True

    def collect(self, timeout: float = 1.0) -> None:
        """Receive at least one pending line (waiting up to `timeout`), keeping it for later."""
        if self._receive(timeout):
            while self._receive(0):
                pass

    def drain(self) -> list[str]:
        """Every line received so far (waiting a moment for stragglers), then forget them."""
        while self._receive(0.05):
            pass
        lines, self.lines = self.lines, []
        return lines

    def wait_for(self, name: str, timeout: float = 15.0) -> str:
        """The first line about secret `name`; the resolver logs after answering the kernel."""
        needle = f" name={name} "
        end = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if needle in line + " ":
                    self.lines.remove(line)
                    return line
            remaining = end - time.monotonic()
            if remaining <= 0 or not self._receive(remaining):
                raise AssertionError(f"no resolver log line for {name!r}; got {self.lines!r}")

    def close(self) -> None:
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


def _write_root_file(path: Path, text: str, mode: int) -> None:
    path.write_text(text)
    os.chown(path, 0, 0)
    os.chmod(path, mode)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    return str(value)


def run_resolver(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed kmskeys-resolver console script."""
    return subprocess.run(
        [str(RESOLVER), *args], check=False, capture_output=True, text=True, timeout=60
    )


@contextmanager
def installed(
    emulator: KmsEmulator,
    proxy: KmsProxy | None,
    key_arn: str,
    names: str = "",
    **settings: Any,
) -> Iterator[Install]:
    """Install a resolver under a fresh prefix with `settings` in its config; remove it after."""
    root = Path(tempfile.mkdtemp(prefix=unique("resolver") + "-"))
    os.chmod(root, 0o755)
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
        "endpoint_url": proxy.url if proxy is not None else emulator.url,
        "shared_credentials_file": credentials,
        "blob_dir": blob_dir,
        "prefix": prefix,
        "syslog_socket": log.path,
        "deadline": 4,
        "negative_ttl": 2,
        **settings,
    }
    config = root / "resolver.toml"
    body = "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
    _write_root_file(config, body + names, 0o644)
    done = run_resolver("install", "--config", str(config), "--prefix", prefix)
    assert done.returncode == 0, done.stderr
    try:
        yield Install(root, prefix, config, blob_dir, emulator, proxy, key_arn, log, values)
    finally:
        undone = run_resolver("uninstall", "--config", str(config), "--prefix", prefix)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        assert undone.returncode == 0, undone.stderr
