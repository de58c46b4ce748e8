"""`kmskeys flush NAME` as root reaches every uid's cached copy and the host cache (rotation).

Three uids cache NAME in keyrings of their own; a new blob is deployed; root flushes; every one
of them gets the new value on its next request. Key permissions still keep each uid's key from
the others, and a non-root flush stays with its own keys.
"""

from __future__ import annotations

import grp
import pwd
import subprocess
import time

import pytest

from kmskeys.contract import ADMIN_GROUP
from tests.support.names import unique
from tests.support.requester import NOBODY, Steps, as_user
from tests.upcall.harness import KMSKEYS, Install

pytestmark = pytest.mark.isolation


def test_root_flush_reaches_every_uid_and_the_host_cache(
    iso: Install, users: tuple[pwd.struct_passwd, pwd.struct_passwd]
) -> None:
    a, b = users
    name = unique("rotate")
    iso.deploy(name, iso.blob(b"kmst-v1", name))
    assert grp.getgrnam(ADMIN_GROUP).gr_mem == []  # install made it, with no members

    def fetch() -> list[object]:
        from kmskeys import Key

        key = Key.request(iso.description(name), b"")
        return [key.serial, key.read().decode()]

    def read_others() -> list[str]:
        # Every serial another uid cached, read as this uid without the client's owner check
        # (the low-level tier): the kernel must refuse each.
        from kmskeys.lowlevel import Key

        out = []
        for serial in others:
            try:
                out.append(Key(serial).read().decode())
            except Exception as exc:
                out.append(type(exc).__name__)
        return out

    others: list[int] = []
    who = (a, b, pwd.getpwuid(NOBODY))
    with (
        Steps(who[0], [fetch, read_others]) as one,
        Steps(who[1], [fetch, read_others]) as two,
        Steps(who[2], [fetch, read_others]) as three,
    ):
        children = (one, two, three)
        assert [c.ready() for c in children] == [{"ok": None}] * 3
        first = [c.run(0) for c in children]
        assert [r["ok"][1] for r in first] == ["kmst-v1"] * 3, first  # type: ignore[index]
        assert iso.decrypts() == 1  # one Decrypt for the host, whatever uid asked
        others.extend(r["ok"][0] for r in first)  # type: ignore[index]

        iso.deploy(name, iso.blob(b"kmst-v2", name))
        done = subprocess.run(
            [str(KMSKEYS), "flush", name, "--prefix", iso.prefix],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "3 cached keys of 3 uids" in done.stdout, done.stdout
        assert "kmst-v" not in done.stdout + done.stderr  # the flush reads no payload

        start = time.monotonic()
        second = [c.run(0) for c in children]
        assert time.monotonic() - start < 1 + 3 * 0.5, "re-resolving took too long"
        assert [r["ok"][1] for r in second] == ["kmst-v2"] * 3, second  # type: ignore[index]
        # Each uid re-decrypts the new blob once for the host: 1 more Decrypt, not 3.
        assert iso.decrypts() == 2
        # Nobody's plaintext is readable by another uid (its own key reads, as it should).
        others[:] = [r["ok"][0] for r in second]  # type: ignore[index]
        for index, child in enumerate(children):
            seen = child.run(1)
            assert isinstance(seen, dict) and "ok" in seen, seen
            for position, value in enumerate(seen["ok"]):
                if position != index:
                    assert value == "KeyPermissionError", seen


def test_a_non_root_flush_stays_with_its_own_keys(
    iso: Install, users: tuple[pwd.struct_passwd, pwd.struct_passwd]
) -> None:
    a, b = users
    name = unique("ownflush")
    iso.deploy(name, iso.blob(b"kmst-own", name))

    def fetch() -> int:
        from kmskeys import Key

        return Key.request(iso.description(name), b"").serial

    def alive(serial: int) -> object:
        def check() -> str:
            from kmskeys import Key

            return Key(serial).describe().description

        return check

    def flush() -> int:
        from kmskeys.cli import main

        return main(["flush", name, "--prefix", iso.prefix])

    with Steps(a, [fetch]) as mine, Steps(b, [fetch]) as theirs:
        assert mine.ready() == theirs.ready() == {"ok": None}
        own = mine.run(0)["ok"]  # type: ignore[index]
        other = theirs.run(0)["ok"]  # type: ignore[index]
        # A real unprivileged flush (setuid: no upcall needed, and the euid is not 0).
        assert as_user(a, flush, mode="setuid") == {"ok": 0}
        gone = as_user(a, alive(own), mode="setuid")
        assert gone in (
            {"error": "KeyRevokedError", "errno": 128},
            {"error": "KeyNotFoundError", "errno": 126},
        ), gone
        assert as_user(b, alive(other), mode="setuid") == {"ok": iso.description(name)}
