"""The Debian package `make dist` builds: installed, used and removed with dpkg on this host.

The module installs it once (`dpkg -i`), checks what it put where, with which owners and modes,
the request-key rule its postinst wrote (the one `kmskeys-resolver install` writes), the empty
kmskeys-admin group, doctor's verdict on a host without AWS, then a real miss through the
installed rule against a moto server on 127.0.0.1. The last test removes and purges it and checks
that nothing is left. The fixture purges the package whatever happened (docs/packaging.md).
"""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmskeys import contract
from kmskeys.contract import ADMIN_GROUP, DEFAULT_PREFIX, rule_file_name
from kmskeys.rules import parse_record
from resolver import config as config_mod
from resolver.install import MARKER, rule_line
from tests.packaging.dist import Dist
from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator
from tests.support.names import unique
from tests.upcall.harness import SyslogReader

pytestmark = pytest.mark.upcall

PACKAGE = "kmskeys"
VENV_DIR = Path("/usr/lib/kmskeys")
RESOLVER = VENV_DIR / "bin" / "kmskeys-resolver"
GATE = VENV_DIR / "lib" / "python3.11" / "site-packages" / "resolver" / contract.GATE_PROGRAM
KMSKEYS = Path("/usr/bin/kmskeys")
SBIN_RESOLVER = Path("/usr/sbin/kmskeys-resolver")
CONFIG = Path(contract.DEFAULT_CONFIG)
BLOB_DIR = Path(contract.DEFAULT_BLOB_DIR)
DEFAULTS = Path("/etc/default/kmskeys")
REQUEST_KEY_D = Path(contract.REQUEST_KEY_D)
RULE = REQUEST_KEY_D / rule_file_name(DEFAULT_PREFIX)
UNIT_DIR = Path("/lib/systemd/system")
UNITS = (
    "kmskeys-resolver.service",
    "kmskeys-firewall.service",
    "kmskeys-prefetch.service",
    "kmskeys-refresh.service",
)
STATE = Path("/var/lib/kmskeys-package")
RUN_DIR = Path("/run/kmskeys")
# What the package owns or makes on a host: none of it may be there before, nor after the purge.
UNIT_FILES = tuple(UNIT_DIR / unit for unit in UNITS)
FOOTPRINT = (VENV_DIR, KMSKEYS, SBIN_RESOLVER, CONFIG.parent, DEFAULTS, RULE, STATE, *UNIT_FILES)
DPKG_LOCK_WAIT = 120.0


def dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    """dpkg ARGS; while another dpkg or apt holds the database lock, wait for it."""
    deadline = time.monotonic() + DPKG_LOCK_WAIT
    while True:
        done = subprocess.run(
            ["dpkg", *args], capture_output=True, text=True, timeout=300, check=False
        )
        if "lock" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(1)


def package_status() -> str | None:
    """dpkg's status of the package ("ii", "rc", ...), or None when dpkg does not know it."""
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Abbrev}", PACKAGE],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return done.stdout.strip() or None if done.returncode == 0 else None


def group_exists() -> bool:
    try:
        grp.getgrnam(ADMIN_GROUP)
    except KeyError:
        return False
    return True


def other_installs() -> list[Path]:
    """Rule files of other kmskeys installations (other tests' and benches' resolvers)."""
    return [
        path
        for path in REQUEST_KEY_D.glob("*.conf")
        if path != RULE and path.read_text(errors="replace").startswith(MARKER)
    ]


@dataclass
class Before:
    """What the host had before the package came: the package must leave it so."""

    group: bool
    run_dir: bool


@pytest.fixture(scope="module")
def host(dist: Dist) -> Iterator[Before]:
    """The package installed with `dpkg -i`; purged afterwards, whatever happened."""
    assert package_status() is None, f"dpkg already knows {PACKAGE}: purge it first"
    present = [str(path) for path in FOOTPRINT if path.exists() or path.is_symlink()]
    assert not present, f"a kmskeys installation is on this host already: {present}"
    before = Before(group_exists(), RUN_DIR.exists())
    try:
        done = dpkg("-i", str(dist.deb))
        assert done.returncode == 0, done.stdout + done.stderr
        yield before
    finally:
        if package_status() is not None:
            dpkg("--purge", PACKAGE)
        # A purge that failed may have left the group the package created.
        if not before.group and group_exists() and not other_installs():
            subprocess.run(["groupdel", ADMIN_GROUP], check=False, capture_output=True)


def mode_of(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_package_metadata_and_contents(dist: Dist) -> None:
    def field(name: str) -> str:
        done = subprocess.run(
            ["dpkg-deb", "-f", str(dist.deb), name],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert (field("Package"), field("Version"), field("Architecture")) == (
        PACKAGE,
        "0.1.0-1",
        arch,
    )
    depends = {dep.strip() for dep in field("Depends").split(",")}
    assert {"python3.11", "keyutils", "libkeyutils1", "passwd"} <= depends, depends
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(dist.deb)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    entries = {
        line.split()[-1].removeprefix("."): line.split()[:2] for line in listing.splitlines()
    }
    # Every file root's: the config root's alone; the rule is no file of the package (postinst
    # writes it with `kmskeys-resolver install`, so that dpkg never restores a removed one).
    assert {owner for _, owner in entries.values()} == {"root/root"}
    assert entries[str(CONFIG)][0] == "-rw-------"
    assert entries[str(GATE)][0] == "-rwxr-xr-x"
    assert not [path for path in entries if path.startswith(str(REQUEST_KEY_D))]
    control = subprocess.run(
        ["dpkg-deb", "--ctrl-tarfile", str(dist.deb)], capture_output=True, timeout=60, check=True
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["tar", "-x", "-C", tmp], input=control, check=True)
        conffiles = Path(tmp, "conffiles").read_text().split()
    assert conffiles == [str(CONFIG), str(DEFAULTS)]


def test_files_owners_and_modes(host: Before) -> None:
    assert package_status() == "ii"
    assert mode_of(CONFIG) == (0, 0, 0o600)
    assert mode_of(CONFIG.parent) == (0, 0, 0o755)
    assert mode_of(BLOB_DIR) == (0, 0, 0o755)
    assert mode_of(GATE) == (0, 0, 0o755)
    assert mode_of(SBIN_RESOLVER) == (0, 0, 0o755)
    assert os.readlink(KMSKEYS) == "../lib/kmskeys/bin/kmskeys"
    for dirpath, dirnames, filenames in os.walk(VENV_DIR):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path.is_symlink():  # bin/python* (Debian's interpreter) and lib64
                target = path.resolve()
                assert target == Path("/usr/bin/python3.11") or VENV_DIR in target.parents, path
                continue
            uid, gid, mode = mode_of(path)
            assert (uid, gid, mode & 0o022) == (0, 0, 0), (dirpath, name, oct(mode))
    for unit in UNITS:
        text = (UNIT_DIR / unit).read_text()
        assert f"ExecStart={RESOLVER} " in text, unit
    # Every file as the package shipped it (DEBIAN/md5sums), no bytecode written since.
    verify = subprocess.run(
        ["dpkg", "--verify", PACKAGE], capture_output=True, text=True, timeout=120, check=False
    )
    assert (verify.returncode, verify.stdout) == (0, ""), verify.stdout + verify.stderr


def test_admin_group_has_no_members(host: Before) -> None:
    assert grp.getgrnam(ADMIN_GROUP).gr_mem == []
    # postinst records a group it created, so that the purge removes that one and no other.
    assert (STATE / "created-admin-group").exists() == (not host.group)


def test_rule_is_the_one_install_writes(host: Before) -> None:
    lines = RULE.read_text().splitlines()
    assert lines[0].startswith(MARKER), lines
    config = config_mod.load(CONFIG)
    # The install's record of itself (docs/resolver.md, "Two installs on one host"), then the rule.
    record = parse_record(lines[1])
    assert record is not None, lines
    wanted = (DEFAULT_PREFIX, str(CONFIG), "kms", str(RESOLVER))
    assert (record.prefix, record.config, record.rules, record.resolver) == wanted, record
    assert lines[2:] == [rule_line(DEFAULT_PREFIX, RESOLVER, CONFIG, config, GATE)]
    assert mode_of(RULE) == (0, 0, 0o644)
    # An admin's own run of install, through the command on PATH, keeps it as it is.
    again = subprocess.run(
        [str(SBIN_RESOLVER), "install", "--config", str(CONFIG)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (again.returncode, again.stdout) == (0, f"{RULE} already up to date\n"), again.stderr


def test_doctor_on_a_host_without_aws(host: Before) -> None:
    # Its own network namespace: the host's network never decides (nor sees) the IMDS probe.
    done = subprocess.run(
        ["unshare", "--net", str(KMSKEYS), "doctor", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    report = json.loads(done.stdout)
    levels = {finding["check"]: finding["level"] for finding in report["findings"]}
    failed = [f for f in report["findings"] if f["level"] == "FAIL"]
    assert (done.returncode, failed) == (0, []), done.stdout
    rule = next(f for f in report["findings"] if f["check"] == "rule")
    assert rule["level"] == "ok" and str(RESOLVER) in rule["message"], rule
    assert levels["config"] == "ok", report
    assert levels["imds"] == "info", report  # off EC2: credentials come from a file


@pytest.fixture
def kms() -> Iterator[tuple[KmsEmulator, str]]:
    emulator = KmsEmulator().start()
    try:
        key = emulator.client().create_key(Description="kmst deb test")["KeyMetadata"]
        yield emulator, key["Arn"]
    finally:
        emulator.stop()


def test_a_miss_resolves_through_the_installed_rule(
    host: Before, kms: tuple[KmsEmulator, str], session_keyring: object, tmp_path: Path
) -> None:
    import encryptor

    emulator, key_arn = kms
    os.chmod(tmp_path, 0o755)
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[default]\n"
        f"aws_access_key_id = {TEST_CREDENTIALS['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {TEST_CREDENTIALS['AWS_SECRET_ACCESS_KEY']}\n"
    )
    os.chmod(credentials, 0o600)
    log = SyslogReader(tmp_path / "log.sock")
    name, secret = unique("deb"), unique("payload").encode()
    blob = BLOB_DIR / f"{name}.kms"
    try:
        # As an admin would: edit the config the package shipped, then re-run install.
        CONFIG.write_text(
            f'key_arns = ["{key_arn}"]\n'
            f'region = "{TEST_CREDENTIALS["AWS_REGION"]}"\n'
            f'endpoint_url = "{emulator.url}"\n'
            f'shared_credentials_file = "{credentials}"\n'
            f'syslog_socket = "{log.path}"\n'
            # Nothing left in root's persistent keyring after the test.
            "host_cache = false\n" + CONFIG.read_text()
        )
        done = subprocess.run(
            [str(SBIN_RESOLVER), "install", "--config", str(CONFIG)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        made = encryptor.encrypt(secret, name, key_arn, client=emulator.client())
        blob.write_text(str(made.to_text()))
        got = subprocess.run(
            [str(KMSKEYS), "get", name], capture_output=True, timeout=60, check=False
        )
        assert (got.returncode, got.stdout) == (0, secret), got.stderr
        # The package's resolver answered (its log line), from the key the test made.
        line = log.wait_for(name)
        assert "outcome=ok" in line and "uid=0 " in line, line
        assert secret.decode() not in line
    finally:
        blob.unlink(missing_ok=True)
        log.close()


def test_remove_then_purge_leave_nothing(host: Before) -> None:
    removed = dpkg("-r", PACKAGE)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert package_status() == "rc"
    assert not RULE.exists()
    assert not [p for p in REQUEST_KEY_D.glob("*.conf") if str(RESOLVER) in p.read_text()]
    for path in (VENV_DIR, KMSKEYS, SBIN_RESOLVER, BLOB_DIR, *UNIT_FILES):
        assert not (path.exists() or path.is_symlink()), path
    # Removal keeps the configuration (conffiles), as Debian does; the purge takes it.
    assert CONFIG.exists() and DEFAULTS.exists()
    # The slot files the test's miss made in the default state_dir, unless another rule uses it.
    if not [p for p in REQUEST_KEY_D.glob("*.conf") if f" {RUN_DIR} " in p.read_text()]:
        assert not RUN_DIR.exists(), "the handlers' slot files outlived the package"

    purged = dpkg("--purge", PACKAGE)
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert package_status() is None
    left = [str(path) for path in FOOTPRINT if path.exists() or path.is_symlink()]
    assert not left, left
    if host.group:
        assert group_exists(), "the purge removed a group the package did not create"
    elif other_installs():
        # Another installation's rule appeared meanwhile: the group must stay, and says why.
        assert group_exists() and "another kmskeys installation" in purged.stderr, purged.stderr
    else:
        assert not group_exists(), purged.stdout + purged.stderr
