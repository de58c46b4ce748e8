"""One log line per request, naming uid, name, outcome and reason, never a payload or a blob."""

from __future__ import annotations

import os

import pytest

from kmskeys import KeyNotFoundError, KeyRejectedError
from tests.support.names import unique
from tests.upcall.conftest import Install

pytestmark = pytest.mark.upcall


def test_log_lines_never_hold_plaintext_or_blob(resolver: Install) -> None:
    secret = b"PLAINTEXT-" + os.urandom(12).hex().encode()
    name = unique("quiet")
    text = resolver.blob(secret, name)
    resolver.deploy(name, text)
    assert resolver.get(name) == secret
    envelope = resolver.blob(secret, name + "-env", envelope=True)
    assert resolver.get(name + "-env", envelope) == secret
    with pytest.raises(KeyRejectedError):
        resolver.get(unique("quiet"), text)  # wrong name: the blob itself is in the callout
    with pytest.raises(KeyRejectedError):
        resolver.get(unique("quiet"), "kmsk1:" + secret.hex())
    with pytest.raises(KeyNotFoundError):
        resolver.get(unique("quiet"))
    lines = resolver.log.drain()
    assert len(lines) == 5, lines
    for line in lines:
        assert secret.decode() not in line and secret.hex() not in line
        assert text[:40] not in line and text[-40:] not in line and envelope[-40:] not in line
        assert line[:3] in ("<83", "<84", "<86"), line  # facility authpriv (10 * 8 + severity)
        assert " kmskeys-resolver[" in line and " uid=0 " in line and " outcome=" in line


def test_exactly_one_line_per_request(resolver: Install) -> None:
    names = [unique("one") for _ in range(3)]
    for name in names:
        resolver.get(name, resolver.blob(b"x", name))
    with pytest.raises(KeyNotFoundError):
        resolver.get(unique("one"))
    lines = resolver.log.drain()
    assert len(lines) == 4
    for name in names:
        assert len([line for line in lines if f" name={name} " in line]) == 1


def test_hostile_description_is_escaped_in_the_log(resolver: Install) -> None:
    from kmskeys import Key

    with pytest.raises(KeyRejectedError):
        Key.request(f"{resolver.prefix}:bad\nname injected=1", b"")
    (line,) = resolver.log.drain()
    assert "\n" not in line
    assert f' name="{resolver.prefix}:bad\\x0aname injected=1" ' in line
