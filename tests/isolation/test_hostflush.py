"""`kmskeys flush NAME` as root reaches every uid's cached copy and the host cache (rotation).

Three uids cache NAME in keyrings of their own; a new blob is deployed; root flushes; every one
of them gets the new value on its next request. Key permissions still keep each uid's key from
the others, and a non-root flush stays with its own keys.
"""

from __future__ import annotations

import errno
import grp
import pwd
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kmskeys import Keyring, KmsKeysError
from kmskeys.cli import EXIT_USAGE
from kmskeys.contract import ADMIN_GROUP, HOSTCACHE_ENTRY_PREFIX
from tests.support.names import unique
from tests.support.requester import NOBODY, Resident, Steps, as_user
from tests.upcall.harness import KMSKEYS, Install, installed

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


def _flush(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KMSKEYS), "flush", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _outcome(func: Callable[[], object]) -> object:
    try:
        return {"ok": func()}
    except KmsKeysError as exc:
        return {"error": type(exc).__name__, "errno": exc.errno}


def _host_cache_heads() -> list[str]:
    """The descriptions of the host cache's entries (in a root child, as the resolver's)."""

    def look() -> list[str]:
        from kmskeys import keyutils
        from kmskeys.hostflush import host_cache_ring

        ring = host_cache_ring(create=False)
        if ring is None:
            return []
        out = []
        for serial in memoryview(keyutils.keyctl_read(ring)).cast("i").tolist():
            try:
                out.append(keyutils.keyctl_describe_alloc(serial).split(b";", 4)[4].decode())
            except KmsKeysError:
                continue
        return out

    found = as_user("root", look)
    assert isinstance(found, dict) and "ok" in found, found
    return list(found["ok"])


def test_root_flush_clears_another_uids_cached_failure(
    iso: Install, users: tuple[pwd.struct_passwd, pwd.struct_passwd]
) -> None:
    """Issue 26.10: a user's failed miss leaves a negative key in the user's own keyring; root's
    flush of the name makes it expire, so the user's next request asks the resolver again."""
    a, _ = users
    assert iso.proxy is not None
    with installed(iso.emulator, iso.proxy, iso.key_arn, negative_ttl=60) as slow:
        name = unique("latecomer")

        def fetch() -> object:
            from kmskeys import get_secret

            return _outcome(lambda: get_secret(name, prefix=slow.prefix).decode())

        with Steps(a, [fetch]) as child:
            assert child.ready() == {"ok": None}
            unknown = {"ok": {"error": "KeyNotFoundError", "errno": errno.ENOKEY}}
            assert child.run(0) == unknown  # no blob yet: refused, and cached for 60 s
            slow.deploy(name, slow.blob(b"kmst-arrived", name))
            assert child.run(0) == unknown  # the cached failure answers, not the resolver
            done = _flush(name, "--prefix", slow.prefix)
            assert done.returncode == 0, done.stderr
            assert "1 cached failures" in done.stdout, done.stdout
            assert child.run(0) == {"ok": {"ok": "kmst-arrived"}}


def test_root_flush_all_respects_the_prefix_and_everything_is_explicit(
    iso: Install, users: tuple[pwd.struct_passwd, pwd.struct_passwd]
) -> None:
    """Issue 26.11: `flush --all --prefix P` as root flushes P's keys and host-cache entries
    only; `flush --everything` is the explicit way to flush every prefix."""
    a, _ = users
    with installed(iso.emulator, iso.proxy, iso.key_arn) as other:
        mine, theirs = unique("allmine"), unique("alltheirs")
        iso.deploy(mine, iso.blob(b"kmst-p1", mine))
        other.deploy(theirs, other.blob(b"kmst-p2", theirs))

        held: list[int] = []  # filled in the child, by its first step

        def fetch() -> list[int]:
            from kmskeys import Key

            held.extend(
                [
                    Key.request(iso.description(mine), b"").serial,
                    Key.request(other.description(theirs), b"").serial,
                ]
            )
            return held

        def alive() -> list[object]:
            from kmskeys import Key

            return [_outcome(lambda s=s: Key(s).describe().description) for s in held]

        with Steps(a, [fetch, alive]) as child:
            assert child.ready() == {"ok": None}
            got = child.run(0)
            assert isinstance(got, dict) and "ok" in got, got
            heads = _host_cache_heads()
            assert any(h.startswith(f"{HOSTCACHE_ENTRY_PREFIX}{other.prefix}:") for h in heads)

            assert _flush("--everything", "--prefix", iso.prefix).returncode == EXIT_USAGE
            done = _flush("--all", "--prefix", iso.prefix)
            assert done.returncode == 0, done.stderr
            assert f"{iso.prefix}:*: flushed 1 cached keys of 1 uids" in done.stdout, done.stdout
            seen = child.run(1)
            assert isinstance(seen, dict) and "ok" in seen, seen
            assert seen["ok"][1] == {"ok": other.description(theirs)}  # the other prefix's stays
            assert seen["ok"][0] != {"ok": iso.description(mine)}
            heads = _host_cache_heads()
            assert not any(h.startswith(f"{HOSTCACHE_ENTRY_PREFIX}{iso.prefix}:") for h in heads)
            assert any(h.startswith(f"{HOSTCACHE_ENTRY_PREFIX}{other.prefix}:") for h in heads)

            done = _flush("--everything")
            assert done.returncode == 0, done.stderr
            assert "every kmskeys key: flushed" in done.stdout, done.stdout
            seen = child.run(1)
            assert isinstance(seen, dict) and "ok" in seen, seen
            assert {"ok": other.description(theirs)} not in seen["ok"]
            # Every entry of both prefixes is gone (another run sharing this kernel may be
            # filling the host cache with prefixes of its own meanwhile).
            ours = tuple(f"{HOSTCACHE_ENTRY_PREFIX}{p}:" for p in (iso.prefix, other.prefix))
            assert not any(h.startswith(ours) for h in _host_cache_heads())


def test_a_forged_proc_keys_line_makes_roots_flush_touch_nothing_unrelated(
    iso: Install, users: tuple[pwd.struct_passwd, pwd.struct_passwd], session_keyring: Keyring
) -> None:
    """Issue 20.7: a user's key description holding a newline forges a line in root's view of
    /proc/keys, naming an unrelated root key's serial as a key of the name to flush, with the
    admin group; root's flush, show and doctor confirm every serial with keyctl_describe, so
    the root key lives on and the flush exits cleanly."""
    a, _ = users
    name = unique("forged")
    # The unrelated root key, in the keyring the flush process inherits (so root could act on
    # it, as possessor): what the forged line names.
    victim = session_keyring.add_key("user", f"kmst-unrelated-{unique()}", b"kmst-root-only")
    gid = grp.getgrnam(ADMIN_GROUP).gr_gid
    forged = (
        f"{victim.serial:08x} I--Q---     1 perm 3f0b0800     0 {gid:5d} user      "
        f"{iso.description(name)}: 5"
    )

    def plant() -> int:
        from kmskeys import lowlevel

        ring = lowlevel.Keyring.session()
        key = lowlevel.Key.add("user", f"kmst-x\n{forged}", b"x", ring)
        key.setperm(0x3F010001)  # other VIEW: root's /proc/keys lists it, forged line and all
        return key.serial

    with Resident(a, plant, session="new") as planter:
        assert isinstance(planter.result, dict) and "ok" in planter.result, planter.result
        proc = Path("/proc/keys").read_text()
        assert forged in proc  # the forgery is really in root's view
        done = _flush(name, "--prefix", iso.prefix)
        assert done.returncode == 0, done.stderr
        assert "nothing cached" in done.stderr, done.stdout + done.stderr
        assert victim.read() == b"kmst-root-only"  # not invalidated
        shown = subprocess.run(
            [str(KMSKEYS), "show", "--prefix", iso.prefix],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert shown.returncode == 0 and str(victim.serial) not in shown.stdout, shown.stdout
        everything = _flush("--everything")
        assert everything.returncode == 0, everything.stderr
        assert victim.read() == b"kmst-root-only"
