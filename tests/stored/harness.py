"""A real resolver install whose rule routes a unique `stored:` prefix, with its own keystore.

Shared by the stored tests (through conftest.py) and the DPAPI benchmark (tests/bench/dpapi.py).
`kmskeys-resolver install --rules stored` writes the rule and creates the keystore (0700);
uninstall and removal of the whole temporary tree come after.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmskeys import Key
from tests.support.kms_emulator import TEST_CREDENTIALS
from tests.support.leftover_keys import flush_install
from tests.support.names import unique, unique_prefix
from tests.support.resolver_daemon import resolver_daemon
from tests.upcall.harness import DAEMON_ENV, RESOLVER, SyslogReader, run_resolver


def toml_value(value: Any) -> str:
    """A TOML literal for a str, Path, bool or number."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    return str(value)


def write_root_file(path: Path, text: str, mode: int) -> None:
    """Write `path` owned by root with `mode`, as the resolver requires of what it trusts."""
    path.write_text(text)
    os.chown(path, 0, 0)
    os.chmod(path, mode)


@dataclass
class StoredInstall:
    """One installed resolver serving `stored_prefix:` from `keystore`."""

    root: Path
    config: Path
    prefix: str
    stored_prefix: str
    keystore: Path
    log: SyslogReader
    settings: dict[str, Any] = field(default_factory=dict)

    def description(self, name: str, qualifier: str = "") -> str:
        return f"{self.stored_prefix}:{name}{qualifier}"

    def request(self, name: str, size: str | bytes = "32", qualifier: str = "") -> bytes:
        """Key.request(stored:NAME..., size).read(): through the real upcall on a miss."""
        return Key.request(self.description(name, qualifier), size).read()

    def entry(self, name: str, version: int = 1, uid: int | None = 0) -> Path:
        """Where the keystore keeps (user uid | machine, name, version)."""
        where = self.keystore / ("machine" if uid is None else f"user/{uid}")
        return where / name.replace("/", ":") / str(version)

    def entries_of(self, name: str) -> list[Path]:
        """Every file in a directory of `name` (any scope or uid), temp files included."""
        return [p for p in self.files() if p.parent.name == name.replace("/", ":")]

    def files(self) -> list[Path]:
        """Every file below the keystore (entries and any temp files), sorted."""
        return sorted(p for p in self.keystore.rglob("*") if p.is_file())


def write_config(path: Path, values: dict[str, Any], extra: str = "") -> None:
    """The resolver config: one `key = value` line per setting, then `extra` sections."""
    body = "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
    write_root_file(path, body + extra, 0o644)


@contextmanager
def stored_installed(
    *,
    names: str = "",
    rules: str = "stored",
    keystore: Path | None = None,
    kms_endpoint: str | None = None,
    resolver: Path = RESOLVER,
    daemon: bool | None = None,
    **settings: Any,
) -> Iterator[StoredInstall]:
    """Install a resolver for a fresh stored prefix with `settings`; remove all of it after.

    `kms_endpoint` points its KMS client (the seal's) at an emulator, with test credentials.
    `resolver` is the kmskeys-resolver that installs itself: the rule runs that one. `daemon`
    runs the resolver daemon for it (default: as KMSKEYS_TEST_DAEMON says, tests/upcall/harness).
    """
    if daemon is None:
        daemon = os.environ.get(DAEMON_ENV) == "1"
    root = Path(tempfile.mkdtemp(prefix=unique("stored") + "-"))
    os.chmod(root, 0o755)
    if daemon:
        settings.setdefault("warm_socket", root / "run" / "resolver.sock")
    keystore = keystore or root / "keystore"
    log = SyslogReader(root / "log.sock")
    if kms_endpoint is not None:
        credentials = root / "credentials"
        write_root_file(
            credentials,
            "[default]\n"
            f"aws_access_key_id = {TEST_CREDENTIALS['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {TEST_CREDENTIALS['AWS_SECRET_ACCESS_KEY']}\n",
            0o600,
        )
        settings = {
            "region": TEST_CREDENTIALS["AWS_REGION"],
            "endpoint_url": kms_endpoint,
            "shared_credentials_file": credentials,
            **settings,
        }
    values: dict[str, Any] = {
        # The kms prefix is unused here, but names the rule file: unique, like every test install.
        "prefix": unique_prefix(),
        "stored_prefix": unique_prefix(),
        "keystore_dir": keystore,
        "blob_dir": root / "blobs",
        "state_dir": root / "state",
        "syslog_socket": log.path,
        "deadline": 20,
        "negative_ttl": 2,
        **settings,
    }
    config = root / "resolver.toml"
    write_config(config, values, names)
    done = run_resolver("install", "--config", str(config), "--rules", rules, resolver=resolver)
    if done.returncode != 0:  # nothing installed: only the temporary tree to remove
        log.close()
        shutil.rmtree(root, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    try:
        with ExitStack() as stack:
            if daemon:
                sock = Path(values["warm_socket"])
                stack.enter_context(resolver_daemon(config, sock, resolver))
            yield StoredInstall(
                root, config, values["prefix"], values["stored_prefix"], keystore, log, values
            )
    finally:
        undone = run_resolver("uninstall", "--config", str(config), resolver=resolver)
        flush_install(values)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        assert undone.returncode == 0, undone.stderr
