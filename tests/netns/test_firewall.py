"""`kmskeys-resolver firewall` in a real network namespace, with real uids, for both backends."""

from __future__ import annotations

import configparser
import os
import pwd
import re
import shlex
import sys
import tempfile
from pathlib import Path

import pytest

from tests.netns.conftest import (
    FOREIGN_HOOKS,
    FOREIGN_IP6T,
    FOREIGN_IPT,
    IMDS,
    NOBODY,
    OTHER,
    PORTS,
    REPO,
    Netns,
)
from tests.support.reach import reach_checkout

pytestmark = pytest.mark.netns

BACKENDS = ["nftables", "iptables"]
FAST = 1.0  # seconds: a reject must fail the caller at once, not after a timeout


def assert_rejected_fast(ns: Netns, host: str, port: int, uid: int, gid: int) -> None:
    attempt = ns.connect(host, port, uid=uid, gid=gid)
    assert not attempt.ok, f"uid {uid} reached {host}:{port} through the firewall"
    assert attempt.error == "ECONNREFUSED", attempt
    assert attempt.elapsed < FAST, attempt


def assert_reaches(
    ns: Netns, host: str, port: int = 80, uid: int | None = None, gid: int = 0
) -> None:
    attempt = ns.connect(host, port, uid=uid, gid=gid)
    assert attempt.ok, (
        f"uid {uid if uid is not None else 0} could not reach {host}:{port}: {attempt}"
    )


def apply(ns: Netns, backend: str, *users: str) -> None:
    args = [arg for user in users for arg in ("--allow-user", user)]
    proc = ns.firewall("apply", "--backend", backend, *args)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_root_and_allowed_users_reach_imds(
    netns: Netns, backend: str, allowed_user: pwd.struct_passwd
) -> None:
    nobody = (NOBODY.pw_uid, NOBODY.pw_gid)
    for host in IMDS:
        assert_reaches(netns, host, 80, *nobody)

    apply(netns, backend, allowed_user.pw_name)

    for host in IMDS:
        for port in PORTS:
            assert_rejected_fast(netns, host, port, *nobody)
            assert_reaches(netns, host, port)
            assert_reaches(netns, host, port, allowed_user.pw_uid, allowed_user.pw_gid)
    for host in OTHER:
        assert_reaches(netns, host, 80, *nobody)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_apply_adds_nothing(
    netns: Netns, backend: str, allowed_user: pwd.struct_passwd
) -> None:
    apply(netns, backend, allowed_user.pw_name)
    once = netns.ruleset()
    apply(netns, backend, allowed_user.pw_name)
    assert netns.ruleset() == once


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_replaces_the_allowed_users(
    netns: Netns, backend: str, allowed_user: pwd.struct_passwd
) -> None:
    apply(netns, backend, allowed_user.pw_name)
    apply(netns, backend)
    for host in IMDS:
        assert_rejected_fast(netns, host, 80, allowed_user.pw_uid, allowed_user.pw_gid)
        assert_reaches(netns, host)


@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_restores_access_and_leaves_exactly_what_was_there(
    netns: Netns, backend: str, allowed_user: pwd.struct_passwd
) -> None:
    before = netns.ruleset()
    apply(netns, backend, allowed_user.pw_name)
    assert netns.ours_left()

    proc = netns.firewall("remove", "--backend", backend)

    assert proc.returncode == 0, proc.stderr
    assert netns.ours_left() == []
    assert netns.ruleset() == before
    for host in IMDS:
        assert_reaches(netns, host, 80, NOBODY.pw_uid, NOBODY.pw_gid)
    again = netns.firewall("remove", "--backend", backend)
    assert again.returncode == 0
    assert "nothing to remove" in again.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_foreign_rules_survive_apply_and_remove(netns: Netns, backend: str) -> None:
    foreign_table = netns.run("nft", "-s", "list", "table", "inet", "kmst_foreign").stdout
    foreign_rules = {
        (tool, hook): shlex.join(["-A", hook, *rule])
        for tool, rule in (("iptables", FOREIGN_IPT), ("ip6tables", FOREIGN_IP6T))
        for hook in FOREIGN_HOOKS
    }

    def assert_foreign_intact() -> None:
        assert (
            netns.run("nft", "-s", "list", "table", "inet", "kmst_foreign").stdout == foreign_table
        )
        for (tool, hook), rule in foreign_rules.items():
            assert rule in netns.run(tool, "-S", hook).stdout, f"{tool}: {rule} is gone"

    apply(netns, backend)
    assert_foreign_intact()
    # The foreign table accepts IMDS traffic; an accept elsewhere must not undo our reject.
    assert_rejected_fast(netns, IMDS[0], 80, NOBODY.pw_uid, NOBODY.pw_gid)
    assert netns.firewall("remove", "--backend", backend).returncode == 0
    assert_foreign_intact()


@pytest.mark.parametrize("backend", BACKENDS)
def test_status_reports_presence_users_counts_and_reachability(
    netns: Netns, backend: str, allowed_user: pwd.struct_passwd
) -> None:
    absent = netns.firewall("status", "--backend", backend)
    assert absent.returncode == 3, absent.stderr
    assert "rules not present" in absent.stdout

    apply(netns, backend, allowed_user.pw_name)
    netns.connect(IMDS[0], 80, uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)
    netns.connect(IMDS[1], 80, uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)
    netns.connect(IMDS[1], 8080, uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)
    proc = netns.firewall("status", "--backend", backend, "--probe-as", "nobody")

    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"{backend}: rules present" in out
    user = allowed_user
    assert f"allowed users: root (uid 0), {user.pw_name} (uid {user.pw_uid})" in out
    assert "rejected packets: output ipv4 1, output ipv6 2, forward ipv4 0, forward ipv6 0" in out
    assert re.search(
        r"imds as root .*: 169\.254\.169\.254:80 connected, \[fd00:ec2::254\]:80 connected", out
    )
    assert re.search(
        r"imds as nobody .*: 169\.254\.169\.254:80 refused, \[fd00:ec2::254\]:80 refused", out
    )


def test_auto_prefers_nftables(netns: Netns) -> None:
    apply(netns, "auto")
    assert netns.ours_left() == ["table inet kmskeys"]
    status = netns.firewall("status")
    assert status.returncode == 0
    assert "nftables: rules present (table inet kmskeys)" in status.stdout
    assert netns.firewall("remove").returncode == 0
    assert netns.ours_left() == []


def test_auto_remove_also_finds_iptables_rules(netns: Netns) -> None:
    apply(netns, "iptables")
    proc = netns.firewall("remove")
    assert proc.returncode == 0
    assert "iptables: removed" in proc.stdout
    assert netns.ours_left() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_user_is_an_error_and_nothing_is_applied(netns: Netns, backend: str) -> None:
    before = netns.ruleset()
    proc = netns.firewall(
        "apply", "--backend", backend, "--allow-user", "root", "--allow-user", "kmst-no-such-user"
    )
    assert proc.returncode == 2
    assert "unknown user 'kmst-no-such-user'" in proc.stderr
    assert netns.ruleset() == before


@pytest.mark.parametrize(
    ("backend", "package"), [("nftables", "nftables"), ("iptables", "iptables")]
)
def test_missing_backend_binary_names_the_package(netns: Netns, backend: str, package: str) -> None:
    before = netns.ruleset()
    with tempfile.TemporaryDirectory(prefix="kmst-") as empty:
        proc = netns.firewall("apply", "--backend", backend, env_path=empty)
        auto = netns.firewall("apply", env_path=empty)
    assert proc.returncode == 5
    assert f"apt-get install {package}" in proc.stderr
    assert auto.returncode == 5
    assert "apt-get install nftables" in auto.stderr
    assert "apt-get install iptables" in auto.stderr
    assert netns.ruleset() == before


@pytest.mark.parametrize("action", ["apply", "remove", "status"])
def test_not_root_is_a_clear_error(action: str, capfd: pytest.CaptureFixture[str]) -> None:
    from resolver.firewall.cli import main

    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            reach_checkout()  # main's lazy imports are read as nobody
            os.setgroups([])
            os.setresgid(NOBODY.pw_gid, NOBODY.pw_gid, NOBODY.pw_gid)
            os.setresuid(NOBODY.pw_uid, NOBODY.pw_uid, NOBODY.pw_uid)
            code = main([action, "--backend", "nftables"])
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 4
    assert f"firewall {action} needs root" in capfd.readouterr().err


@pytest.mark.parametrize("backend", BACKENDS)
def test_print_writes_a_valid_ruleset_without_applying(
    netns: Netns, backend: str, allowed_user: pwd.struct_passwd
) -> None:
    before = netns.ruleset()
    proc = netns.firewall("print", "--backend", backend, "--allow-user", allowed_user.pw_name)
    assert proc.returncode == 0, proc.stderr
    assert netns.ruleset() == before
    if backend == "nftables":
        assert f'{allowed_user.pw_uid} comment "{allowed_user.pw_name}"' in proc.stdout
        netns.run("nft", "-c", "-f", "-", stdin=proc.stdout)
        return
    sections = re.split(r"^# --- (\S+) --noflush ---$", proc.stdout, flags=re.M)[1:]
    assert [tool for tool in sections[::2]] == ["iptables-restore", "ip6tables-restore"]
    for tool, text in zip(sections[::2], sections[1::2], strict=True):
        assert f"--uid-owner {allowed_user.pw_uid} " in text
        netns.run(tool, "--test", "--noflush", stdin=text)
    assert netns.ruleset() == before


def test_systemd_unit_applies_the_rules(netns: Netns) -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read(REPO / "resolver" / "data" / "kmskeys-firewall.service")
    assert unit["Service"]["Type"] == "oneshot"
    assert "network-online.target" in unit["Unit"]["Before"].split()
    command = shlex.split(unit["Service"]["ExecStart"])
    assert command[:2] == ["kmskeys-resolver", "firewall"]
    # The unit's optional arguments come from an environment file; none here.
    args = [arg for arg in command[2:] if not arg.startswith("$")]

    proc = netns.firewall(*args)

    assert proc.returncode == 0, proc.stderr
    assert netns.ours_left() == ["table inet kmskeys"]
    assert_rejected_fast(netns, IMDS[1], 80, NOBODY.pw_uid, NOBODY.pw_gid)
    assert Path(REPO / "docs" / "firewall.md").read_text().count("kmskeys-firewall.service") >= 1


def test_iptables_apply_recovers_from_an_interrupted_swap(netns: Netns) -> None:
    apply(netns, "iptables")
    clean = netns.ruleset()
    # As if a previous apply stopped between the swap and the rename.
    netns.run("iptables", "-E", "KMSKEYS-IMDS", "KMSKEYS-IMDS-NEW")

    apply(netns, "iptables")

    assert netns.ruleset() == clean
    assert_rejected_fast(netns, IMDS[0], 80, NOBODY.pw_uid, NOBODY.pw_gid)
