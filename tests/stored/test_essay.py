"""The essay's `stored:` flow through the real upcall: the same random key, request after request.

`keyctl request2 user stored:NAME 32` from a shell, the callout as the key size, and what the
resolver refuses (bad size, a size other than the stored one, bad qualifiers), each with its log
line. "Rebooted" here means every kernel copy gone: a new session keyring with nothing cached.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from kmskeys import KeyNotFoundError, KeyRejectedError, Keyring
from tests.stored.harness import StoredInstall, stored_installed
from tests.support.names import unique

pytestmark = pytest.mark.upcall

ESSAY = r"""
set -eu
id=$(keyctl request2 user "$DESC" "$SIZE" @s)
first=$(keyctl pipe "$id" | sha256sum | cut -c1-64)
size=$(keyctl pipe "$id" | wc -c)
keyctl unlink "$id" @s > /dev/null
id=$(keyctl request2 user "$DESC" "$SIZE" @s)
again=$(keyctl pipe "$id" | sha256sum | cut -c1-64)
keyctl clear @s
echo "$size $first $again"
"""


def _shell(desc: str, size: str) -> list[str]:
    # `keyctl session -` runs the script in a new anonymous session keyring: nothing cached.
    done = subprocess.run(
        ["keyctl", "session", "-", "bash", "-c", ESSAY],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DESC": desc, "SIZE": size},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_essay_flow_from_the_shell(stored: StoredInstall) -> None:
    name = unique("essay")
    desc = stored.description(name)
    size, first, again = _shell(desc, "32")
    assert size == "32"
    assert first == again  # unlinked, then requested again: the same bytes
    # A "reboot": another session, nothing cached anywhere, the key comes from the keystore.
    _, after_reboot, _ = _shell(desc, "32")
    assert after_reboot == first
    # Every request above missed (each session starts empty): four lines, the first creating.
    # A line comes after the answer, so wait for each rather than take what is there.
    mine = [stored.log.wait_for(name) for _ in range(4)]
    assert "source=keystore-new" in mine[0] and "mode=user.v1" in mine[0]
    assert all("source=keystore " in line for line in mine[1:])
    assert stored.entries_of(name) == [stored.entry(name)]
    assert first not in "".join(mine)  # no key material in the log


def test_empty_callout_means_32_bytes(stored: StoredInstall) -> None:
    name = unique("empty")
    size, first, again = _shell(stored.description(name), "")
    assert size == "32" and first == again
    # Asked for explicitly later, the same key answers.
    Keyring.join_session()
    assert hashlib.sha256(stored.request(name, "32")).hexdigest() == first


@pytest.mark.parametrize("size", [16, 4096])
def test_sizes_at_the_limits(stored: StoredInstall, size: int) -> None:
    name = unique(f"size{size}")
    key = stored.request(name, str(size))
    assert len(key) == size
    Keyring.join_session()
    assert stored.request(name, str(size)) == key


@pytest.mark.parametrize("callout", ["15", "4097", "abc", "032", " 32", "-16", "3" * 40])
def test_bad_size_is_refused(stored: StoredInstall, callout: str) -> None:
    name = unique("badsize")
    with pytest.raises(KeyRejectedError):
        stored.request(name, callout)
    line = stored.log.wait_for(name)
    assert "errno=EKEYREJECTED" in line and "bad size" in line
    assert not stored.entry(name).exists()


def test_other_size_than_the_stored_key_is_refused_never_recreated(stored: StoredInstall) -> None:
    name = unique("resize")
    key = stored.request(name, "32")
    entry = stored.entry(name)
    kept = entry.read_bytes()
    stored.log.wait_for(name)  # the creation's line, out of the way
    Keyring.join_session()
    with pytest.raises(KeyRejectedError):
        stored.request(name, "64")
    line = stored.log.wait_for(name)
    assert "is 32 bytes, the request asks for 64" in line
    assert entry.read_bytes() == kept
    assert stored.entries_of(name) == [entry]
    Keyring.join_session()
    assert stored.request(name, "32") == key


@pytest.mark.parametrize(
    "qualifier", ["#v0", "#v01", "#v", "#latest#v2", "#bogus", "#user#scope", "#machine#user", "#"]
)
def test_bad_qualifier_is_refused(stored: StoredInstall, qualifier: str) -> None:
    name = unique("qual")
    with pytest.raises(KeyRejectedError):
        stored.request(name, "32", qualifier)
    line = stored.log.wait_for(name)
    assert "errno=EKEYREJECTED" in line and "qualifier" in line
    assert not stored.entry(name).exists()


def test_versions_latest_and_scope_through_the_description(stored: StoredInstall) -> None:
    name = unique("select")
    key = stored.request(name)
    assert stored.request(name, "32", "#user") == key
    assert stored.request(name, "32", "#user#v1") == key
    assert stored.request(name, "32", "#latest") == b"1"
    assert stored.request(name, "32", "#scope") == b"user"
    for _ in range(5):  # each description above was a miss of its own
        stored.log.wait_for(name)
    with pytest.raises(KeyNotFoundError):
        stored.request(name, "32", "#v2")
    assert "no version 2" in stored.log.wait_for(name)


def test_bad_name_is_refused_before_any_file(stored: StoredInstall) -> None:
    with pytest.raises(KeyRejectedError):
        stored.request("a/../b")
    # An invalid name is logged as the whole description it came in.
    assert "'..'" in stored.log.wait_for(stored.description("a/../b"))


@pytest.mark.parametrize("rules", ["kms", "stored", "both"])
def test_install_routes_the_prefixes_asked_for(rules: str) -> None:
    with stored_installed(rules=rules) as other:
        rule_file = Path("/etc/request-key.d") / f"kmskeys-{other.prefix}.conf"
        lines = rule_file.read_text().splitlines()
        routed = {line.split()[2] for line in lines if line.startswith("create ")}
        want = {"kms": {other.prefix}, "stored": {other.stored_prefix}}.get(
            rules, {other.prefix, other.stored_prefix}
        )
        assert routed == {f"{p}:*" for p in want}
        assert other.keystore.is_dir() == (rules != "kms")
        if rules != "kms":
            assert other.keystore.stat().st_mode & 0o777 == 0o700
        Keyring.join_session()
        if rules == "kms":
            # No stored: rule, so no upcall at all: request-key finds no rule and negates.
            with pytest.raises(KeyNotFoundError):
                other.request(unique("unrouted"))
        else:
            assert len(other.request(unique("routed"))) == 32
