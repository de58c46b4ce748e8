"""The package's maintainer scripts on a clean Debian 12, in a chroot: the group and the rules.

This host already has a kmskeys-admin group (other installs made it), so test_deb.py sees the
package keep a group it did not create. The root scripts/debian-root.sh makes (`make
.debian-root/.built`) has a group database and a request-key.d of its own: here the package
creates the group and its purge removes it, a live key carrying the group's gid keeps it, and a
group with members or another installation's rule make the install fail, left as they were.
dpkg runs in a mount namespace of its own with the root's /proc mounted (postrm reads
/proc/keys); the mount goes with the namespace. Each test purges the package and removes what
it made in the root.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from kmskeys import Keyring
from kmskeys.contract import ADMIN_GROUP
from resolver.install import MARKER
from tests.packaging.dist import ROOT, Dist
from tests.support.names import unique, unique_prefix

pytestmark = pytest.mark.kernel

DEB_ROOT = ROOT / ".debian-root"
RULE = DEB_ROOT / "etc" / "request-key.d" / "kmskeys.conf"
CREATED = DEB_ROOT / "var" / "lib" / "kmskeys-package" / "created-admin-group"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
# group VIEW|SEARCH, as the resolver gives its keys (kmskeys/contract.py ADMIN_GROUP_PERM), and
# the possessor everything, so that the test can remove it.
ADMIN_VISIBLE = 0x3F010900


def in_root(*argv: str) -> subprocess.CompletedProcess[str]:
    """ARGV in the Debian root: chroot, in a mount namespace with the root's /proc mounted."""
    script = 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(DEB_ROOT),
         *argv],
        env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def group_line() -> str | None:
    done = in_root("getent", "group", ADMIN_GROUP)
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.fixture
def deb(dist: Dist) -> Iterator[str]:
    """The package copied into the root (its path there); purged and the root cleaned after."""
    if not (DEB_ROOT / ".built").exists():
        pytest.fail(f"no Debian root at {DEB_ROOT}: run `make {DEB_ROOT.name}/.built`")
    assert in_root("dpkg-query", "-W", "kmskeys").returncode != 0, "kmskeys in the root"
    assert group_line() is None and not RULE.exists(), "leftovers in the root"
    inside = f"/tmp/{unique('deb')}.deb"
    shutil.copy(dist.deb, DEB_ROOT / inside.lstrip("/"))
    try:
        yield inside
    finally:
        in_root("dpkg", "--purge", "kmskeys")
        (DEB_ROOT / inside.lstrip("/")).unlink(missing_ok=True)
        RULE.unlink(missing_ok=True)
        if group_line() is not None:
            in_root("groupdel", ADMIN_GROUP)


def test_install_creates_the_group_and_purge_removes_it(deb: str) -> None:
    installed = in_root("dpkg", "-i", deb)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    line = group_line()
    assert line is not None and line.endswith(":"), line  # no members
    gid = line.split(":")[2]
    assert CREATED.read_text().strip() == gid
    assert RULE.read_text().startswith(MARKER)
    removed = in_root("dpkg", "-r", "kmskeys")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not RULE.exists()
    assert group_line() == line  # a removal keeps it; the purge decides
    purged = in_root("dpkg", "--purge", "kmskeys")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert f"removed group {ADMIN_GROUP}" in purged.stdout, purged.stdout + purged.stderr
    assert group_line() is None
    assert not CREATED.parent.exists()
    assert in_root("dpkg-query", "-W", "kmskeys").returncode != 0


def test_a_live_key_with_the_group_gid_keeps_the_group(deb: str, session_keyring: Keyring) -> None:
    installed = in_root("dpkg", "-i", deb)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    line = group_line()
    assert line is not None
    gid = int(line.split(":")[2])
    # A key as the resolver leaves one: the group's gid, group VIEW|SEARCH.
    key = session_keyring.add_key("user", f"{unique_prefix()}:{unique()}", b"not a secret")
    subprocess.run(["keyctl", "chgrp", str(key.serial), str(gid)], check=True)
    subprocess.run(["keyctl", "setperm", str(key.serial), hex(ADMIN_VISIBLE)], check=True)
    purged = in_root("dpkg", "--purge", "kmskeys")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert f"kept group {ADMIN_GROUP}: 1 live keys carry its gid {gid}" in purged.stderr, (
        purged.stdout + purged.stderr
    )
    assert group_line() == line


def test_a_group_with_members_fails_the_install(deb: str) -> None:
    made = in_root("sh", "-c", f"groupadd --system {ADMIN_GROUP} && usermod -aG {ADMIN_GROUP} root")
    assert made.returncode == 0, made.stderr
    line = group_line()
    installed = in_root("dpkg", "-i", deb)
    assert installed.returncode != 0
    assert "has members (root)" in installed.stderr, installed.stdout + installed.stderr
    assert not RULE.exists()
    purged = in_root("dpkg", "--purge", "kmskeys")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert group_line() == line  # not the package's: left as it was


def test_another_installations_rule_fails_the_install_and_stays(deb: str) -> None:
    theirs = (
        f"{MARKER} (prefix kms); `kmskeys-resolver uninstall` removes this file.\n"
        "create user kms:* * /opt/kmskeys/bin/kmskeys-resolver handle --config "
        "/opt/kmskeys/resolver.toml %k %d %u %g %T %P %S\n"
    )
    RULE.write_text(theirs)
    installed = in_root("dpkg", "-i", deb)
    assert installed.returncode != 0
    assert "belongs to another kmskeys installation" in installed.stderr, installed.stderr
    purged = in_root("dpkg", "--purge", "kmskeys")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert RULE.read_text() == theirs
    assert group_line() is None  # the install stopped before making it
