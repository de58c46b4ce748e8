"""The four newcomer mistakes: each error points somewhere, and a log line exists somewhere.

Resolver not installed, the app using another prefix, a config typo, and a host without a
syslog socket. The client's message names the cause or points to `kmskeys doctor`, and the
handler's line, when a handler ran, is in syslog or, without one, in /dev/kmsg.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kmskeys import KeyNotFoundError, KeyRejectedError, get_secret
from tests.support.names import unique, unique_prefix
from tests.upcall.conftest import Install
from tests.upcall.test_doctor import problems, report

pytestmark = pytest.mark.upcall

KMSG = Path("/dev/kmsg")


class KmsgReader:
    """Records written to /dev/kmsg from now on (root reads them, as dmesg does)."""

    def __init__(self) -> None:
        self.fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def wait_for(self, needle: str, timeout: float = 10.0) -> str:
        """The first new record holding `needle` (its message part)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                record = os.read(self.fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                time.sleep(0.01)
                continue
            except BrokenPipeError:
                continue  # records were overwritten meanwhile: the next read goes on
            message = record.partition(";")[2]
            if needle in message:
                return message
        raise AssertionError(f"no /dev/kmsg record with {needle!r}")

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def kmsg() -> Iterator[KmsgReader]:
    reader = KmsgReader()
    try:
        yield reader
    finally:
        reader.close()


def test_resolver_not_installed(session_keyring: object) -> None:
    prefix = unique_prefix()  # no rule routes it anywhere
    name = unique("noinstall")
    with pytest.raises(KeyNotFoundError) as caught:
        get_secret(name, prefix=prefix)
    message = str(caught.value)
    print(message)
    # The kernel negated the unrouted key itself, for 60 s: the message says so, names the
    # cause it can see (no rule for the prefix), and not "check the name, deploy a blob".
    assert "no resolver answered this request" in message
    assert f"no rule in /etc/request-key.d routes {prefix}:* to a resolver" in message
    assert "blob is deployed" not in message
    assert f"run `kmskeys doctor --prefix {prefix}`" in message
    assert (
        "cached failure (key " in message and f"kmskeys flush {name} --prefix {prefix}" in message
    )
    found = report("--prefix", prefix)
    (rule,) = problems(found, {"rule"})
    assert "no rule" in rule["message"] and f"--prefix {prefix}" in rule["fix"]


def test_app_uses_another_prefix(resolver: Install) -> None:
    wrong = unique_prefix()
    name = unique("wrongprefix")
    text = resolver.blob(b"x", name)
    with pytest.raises(KeyNotFoundError) as caught:
        get_secret(name, text, prefix=wrong)
    assert f"`kmskeys doctor --prefix {wrong}`" in str(caught.value)
    found = report("--prefix", wrong)
    (rule,) = problems(found, {"rule"})
    # Doctor shows what is installed: the app's prefix is the one to change.
    assert f"kmskeys-{resolver.prefix}.conf" in rule["message"]
    assert "if the app should use another prefix" in rule["message"]


def test_config_typo(extra_install: Callable[..., Any]) -> None:
    with extra_install() as install:
        config = install.config
        config.write_text(config.read_text().replace("endpoint_url =", "endpoint ="))
        name = unique("typo")
        with pytest.raises(KeyRejectedError) as caught:
            install.get(name, install.blob(b"x", name))
        # The file is trusted, only invalid: its syslog_socket still says where the line goes.
        line = install.log.wait_for(f"{install.prefix}:{name}")
        assert "outcome=refused" in line and "unknown key 'endpoint'" in line
        message = str(caught.value)
        assert f"`kmskeys doctor --prefix {install.prefix}`" in message
        assert "journalctl -t kmskeys-resolver" in message
        (item,) = problems(report("--prefix", install.prefix), {"config"})
        assert "unknown key 'endpoint'" in item["message"] and "endpoint_url" in item["fix"]


def test_host_without_a_syslog_socket(extra_install: Callable[..., Any]) -> None:
    # A test-only syslog path that does not exist: the host's /dev/log is left alone.
    missing = f"/run/{unique('nolog')}.sock"
    with extra_install(syslog_socket=missing) as install, kmsg() as reader:
        name = unique("nolog")
        with pytest.raises(KeyNotFoundError) as caught:
            install.get(name)  # no NAME.kms: refused, and logged
        line = reader.wait_for(f" name={name} ")
        assert line.startswith("kmskeys-resolver[") and "outcome=unknown" in line
        assert f"(syslog socket {missing}: No such file or directory; logged to /dev/kmsg" in line
        assert caught.value.errno == errno.ENOKEY
        assert "dmesg on a host without /dev/log" in str(caught.value)
