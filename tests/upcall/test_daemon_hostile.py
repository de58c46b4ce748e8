"""Hostile descriptions and callouts through kmskeys-gate to the resolver daemon.

The gate runs as root and reads the description (KEYCTL_DESCRIBE, `type;uid;gid;perm;desc`),
the callout and /proc/keys for the daemon: each is hostile input. Every request here must end
in a defined refusal written by the daemon, the daemon must keep serving, and no line of what
the requester chose may reach the log unquoted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kmskeys import Key, KeyNotFoundError, KeyRejectedError, Keyring
from kmskeys.contract import CALLOUT_MAX, DESCRIPTION_MAX
from tests.support.names import unique
from tests.upcall.daemonpath import writer
from tests.upcall.harness import Install

pytestmark = pytest.mark.upcall

# Every kind of byte the gate's parsing could trip on: the describe separator, a forged
# /proc/keys line (a newline, then a serial and the authorization key's shape), control
# characters, quotes, percent signs, and bytes that are not UTF-8.
HOSTILE = (
    b"kmst-a;user;0;0;3f3f3f3f;\n0badbeef I------     1 perm 3f010000     0     0 .request_"
    b" key:1 pid:1 ci:0\n\t\r\x1b[31m\"'\\%s%n%x\xff\xfe\xc3("
)


@pytest.fixture(scope="module")
def daemon_install(kms_backend: tuple[Any, Any, str]) -> Iterator[Install]:
    """One install served by the daemon for the whole module."""
    from tests.upcall.harness import installed

    emulator, proxy, key_arn = kms_backend
    with installed(emulator, proxy, key_arn, daemon=True, max_concurrent_per_uid=8) as install:
        yield install


def _refused(install: Install, description: bytes, callout: bytes = b"") -> type[BaseException]:
    Keyring.join_session()
    with pytest.raises((KeyRejectedError, KeyNotFoundError)) as raised:
        Key.request(description, callout)
    return raised.type


def _line_about(install: Install, match: Callable[[str], bool]) -> str:
    install.log.collect(timeout=10)
    lines = install.log.drain()
    found = [line for line in lines if match(line)]
    assert len(found) == 1, lines
    return found[0]


def test_every_prefix_of_a_hostile_description_is_refused_by_the_daemon(
    daemon_install: Install,
) -> None:
    daemon = daemon_install.daemon
    assert daemon is not None
    head = f"{daemon_install.prefix}:".encode()
    daemon_install.log.drain()
    for end in range(len(HOSTILE) + 1):
        _refused(daemon_install, head + HOSTILE[:end])
        daemon_install.log.collect(timeout=10)
    lines = daemon_install.log.drain()
    assert len(lines) == len(HOSTILE) + 1, lines[-3:]
    for line in lines:
        assert writer(line) == daemon.pid, line
        assert re.search(r" outcome=(refused|unknown) ", line), line
        assert re.search(r" errno=(EKEYREJECTED|ENOKEY) ", line), line
        # One syslog datagram, one line; no raw control byte or lone quote of the requester's.
        assert "\n" not in line and "\x1b" not in line, line
    assert daemon.poll() is None


def test_a_description_of_the_kernels_longest_is_refused_by_the_daemon(
    daemon_install: Install,
) -> None:
    daemon = daemon_install.daemon
    assert daemon is not None
    head = f"{daemon_install.prefix}:kmst-long-".encode()
    longest = head + b"x" * (DESCRIPTION_MAX - len(head))
    assert len(longest) == DESCRIPTION_MAX
    daemon_install.log.drain()
    assert _refused(daemon_install, longest) is KeyRejectedError
    line = _line_about(daemon_install, lambda x: "kmst-long-xxx" in x)
    assert writer(line) == daemon.pid and "longer than 200 bytes" in line and "..." in line, line


def test_non_utf8_and_control_bytes_in_a_name_are_quoted(daemon_install: Install) -> None:
    daemon = daemon_install.daemon
    assert daemon is not None
    description = f"{daemon_install.prefix}:".encode() + b'kmst-\xff\xfe-\x07-"q"'
    daemon_install.log.drain()
    assert _refused(daemon_install, description) is KeyRejectedError
    line = _line_about(daemon_install, lambda x: "kmst-" in x and "refused" in x)
    assert writer(line) == daemon.pid, line
    # As the handler logs it from its argv: undecodable bytes escaped, control bytes too.
    assert ":kmst-\\xdcff\\xdcfe-\\x07-\\x22q\\x22" in line, line
    assert "\x07" not in line and '"q"' not in line, line


@pytest.mark.parametrize(
    "callout",
    [
        bytes(range(1, 256)) * 16,  # every byte but NUL, past the limit: cut below
        HOSTILE * 40,
        b"kmsk2:" + b"A" * (CALLOUT_MAX - 6),
        b"\n" * CALLOUT_MAX,
    ],
    ids=["every-byte", "hostile", "fake-blob", "newlines"],
)
def test_a_hostile_callout_is_refused_by_the_daemon(
    daemon_install: Install, callout: bytes
) -> None:
    daemon = daemon_install.daemon
    assert daemon is not None
    callout = callout[:CALLOUT_MAX]
    name = unique("callout")
    daemon_install.log.drain()
    assert _refused(daemon_install, daemon_install.description(name).encode(), callout) in (
        KeyRejectedError,
        KeyNotFoundError,
    )
    line = daemon_install.log.wait_for(name)
    assert writer(line) == daemon.pid and "outcome=refused" in line, line
    # The daemon, asked again with a real blob, still answers.
    good = unique("aftercallout")
    Keyring.join_session()
    blob = daemon_install.blob(b"kmst-after", good)
    assert Key.request(daemon_install.description(good), blob).read() == b"kmst-after"
