"""doctor's checks of what the configured backends need on this host (issue 26, operator round):
program-bound names (cgroup v2, Yama, the key count), the stored: keystore (flat-layout
leftovers, the userdel hook), pass:/token: (gpg, the PKCS#11 module) and refresh-ahead (a
refresher running). Each broken state is made for real where the host allows it (a keystore
entry moved back to the flat layout, no refresher), doctor's fix is pasted, doctor passes; the
kernel's own settings (cgroup mounts, Yama, sysctl) are the host's, so those checks read files
a test hands them.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kmskeys.doctor.programs import MIN_MAXKEYS, check_program_host
from kmskeys.doctor.stored import check_stored
from kmskeys.doctor.tools import check_tools
from resolver.selfcheck import _config_report
from tests.stored.harness import stored_installed
from tests.support.names import unique
from tests.upcall.conftest import KMSKEYS
from tests.upcall.test_doctor import _shell
from tests.upcall.test_doctor_fixes import broken, doctor

pytestmark = pytest.mark.upcall


def _loaded(tmp_path: Path, **values: Any) -> dict[str, Any]:
    path = tmp_path / "resolver.toml"
    body = "".join(
        f'{k} = "{v}"\n' if isinstance(v, str | Path) else f"{k} = {v}\n" for k, v in values.items()
    )
    path.write_text(body)
    report, config = _config_report(path)
    assert config is not None, report
    return dict(report)


PROGRAM_POLICY = '\n[names."kmst-*"]\nallow_units = ["app.service"]\n'


def _with_policy(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "resolver.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\n' + PROGRAM_POLICY)
    report, config = _config_report(path)
    assert config is not None, report
    return dict(report)


def test_program_bound_names_need_cgroup_v2_yama_and_a_key_count(tmp_path: Path) -> None:
    config = _with_policy(tmp_path)
    assert config["program_policies"]
    no_cgroup2 = tmp_path / "mountinfo"
    no_cgroup2.write_text("22 1 0:21 / /proc rw - proc proc rw\n")
    yama, maxkeys, maxbytes = tmp_path / "ptrace", tmp_path / "maxkeys", tmp_path / "maxbytes"
    yama.write_text("0\n")
    maxkeys.write_text("200\n")
    maxbytes.write_text("20000\n")

    def found(**files: Path) -> dict[str, tuple[str, str | None]]:
        paths = {"mountinfo": no_cgroup2, "ptrace_scope": yama, "maxkeys": maxkeys}
        paths.update(files)
        items = check_program_host(config, maxbytes=maxbytes, **paths)  # type: ignore[arg-type]
        return {f.message.split(":")[0][:40]: (f.level, f.fix) for f in items}

    levels = [level for level, _ in found().values()]
    assert levels.count("FAIL") == 1 and levels.count("warn") == 2, found()
    fixes = " ".join(fix or "" for _, fix in found().values())
    assert "mount -t cgroup2" in fixes
    assert "sysctl -w kernel.yama.ptrace_scope=1" in fixes
    assert f"kernel.keys.maxkeys={MIN_MAXKEYS}" in fixes
    # A host that has them: cgroup2 mounted, Yama at 1, a key count that holds.
    good = tmp_path / "good-mountinfo"
    good.write_text("41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n")
    yama.write_text("1\n")
    maxkeys.write_text("2000\n")
    maxbytes.write_text("200000\n")
    assert {level for level, _ in found(mountinfo=good).values()} == {"ok"}
    # No Yama at all (this project's CI kernel): said, with what closes it instead.
    none = found(mountinfo=good, ptrace_scope=tmp_path / "absent")
    assert ("info", None) in none.values(), none
    # Without program-bound names, nothing of this is asked.
    plain = dict(config, program_policies=[])
    assert list(check_program_host(plain, mountinfo=no_cgroup2)) == []  # type: ignore[arg-type]


def test_doctor_reports_a_program_policy_hosts_needs(extra_install: Callable[..., Any]) -> None:
    with extra_install(names=PROGRAM_POLICY) as install:
        found = doctor(KMSKEYS, "--prefix", install.prefix, "--config", str(install.config))
    programs = [f for f in found["findings"] if f["check"] == "programs"]
    # This host: cgroup2 is mounted; what Yama and the key count say is the kernel's.
    assert programs and all("cgroup v2" not in f["message"] for f in programs), programs


def test_a_keystore_left_in_the_flat_layout_is_migrated_by_the_fix() -> None:
    with stored_installed(rules="stored") as stored:
        args = ("--prefix", stored.stored_prefix, "--config", str(stored.config))
        name = unique("flatleft")
        key = stored.request(name)
        entry = stored.entry(name, 1, uid=0)
        os.rename(entry, entry.parent.parent / f"{entry.parent.name}#1")
        entry.parent.rmdir()
        found = doctor(KMSKEYS, *args)
        (item,) = [f for f in broken(found) if f["check"] == "stored"]
        assert "1 entries in the flat layout" in item["message"], item
        assert item["fix"].endswith(f"stored --config {stored.config} migrate"), item
        assert _shell(item["fix"]).returncode == 0
        assert entry.is_file()
        after = doctor(KMSKEYS, *args)
        assert not [f for f in broken(after) if f["check"] == "stored"], after
        stored_ok = [f for f in after["findings"] if f["check"] == "stored"]
        assert any("one directory per name" in f["message"] for f in stored_ok), stored_ok
        # The userdel hook: what to do, not pasted (/etc/login.defs is the host's).
        assert any("userdel" in f["message"] for f in after["findings"]), after
        # The same key after the move.
        subprocess.run([str(KMSKEYS), "flush", name, "--prefix", stored.stored_prefix], check=False)
        assert stored.request(name) == key


def test_the_userdel_hook_is_found_when_login_defs_runs_it(tmp_path: Path) -> None:
    config_path = tmp_path / "resolver.toml"
    config = _loaded(tmp_path, state_dir=tmp_path / "state")
    routed = {config["stored_prefix"]}
    login_defs = tmp_path / "login.defs"
    login_defs.write_text("UMASK 022\n")
    (missing,) = check_stored(config, config_path, routed, login_defs)  # type: ignore[arg-type]
    assert missing.level == "info" and "userdel-hook --write" in missing.message
    hook = tmp_path / "hook"
    hook.write_text(
        f'#!/bin/sh\nexec /x/kmskeys-resolver stored --config {config_path} retire --user "$1"\n'
    )
    login_defs.write_text(f"UMASK 022\nUSERDEL_CMD {hook}\n")
    (enabled,) = check_stored(config, config_path, routed, login_defs)  # type: ignore[arg-type]
    assert enabled.level == "ok", enabled
    assert list(check_stored(config, config_path, set(), login_defs)) == []  # type: ignore[arg-type]


def test_pass_and_token_need_gpg_and_the_pkcs11_module(tmp_path: Path) -> None:
    module = tmp_path / "gone" / "libsofthsm2.so"
    config = _loaded(
        tmp_path,
        state_dir=tmp_path / "state",
        token_module=module,
        token_label="kmst",
        token_key_label="kmst",
        token_pin_file=tmp_path / "pin",
    )
    config_path = tmp_path / "resolver.toml"
    routed = {config["pass_prefix"], config["token_prefix"]}
    found = {f.check + f.level: f for f in check_tools(config, config_path, routed)}  # type: ignore[arg-type]
    # gpg is installed on this host (Debian's gnupg); the module is not there.
    assert found["toolsok"].message.endswith("/usr/bin/gpg, which is there")
    failed = found["toolsFAIL"]
    assert f"token_module {module} is missing" in failed.message and failed.fix
    # Not routed: not asked.
    assert list(check_tools(config, config_path, set())) == []  # type: ignore[arg-type]
    # gpg missing, as the resolver reports it.
    gone = dict(config, tools={"gpg": {"path": "/nonexistent/gpg", "ok": False}})
    (item,) = check_tools(gone, config_path, {config["pass_prefix"]})  # type: ignore[arg-type]
    assert item.level == "FAIL" and "install -y gnupg" in (item.fix or "")


def _refreshers(config: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"refresh" in argv and os.fsencode(config) in argv:
                found.append(int(entry.name))
    return found


def test_refresh_ahead_without_a_refresher_is_started_by_the_fix(
    extra_install: Callable[..., Any],
) -> None:
    with extra_install(refresh_ahead=True) as install:
        args = ("--prefix", install.prefix, "--config", str(install.config))
        try:
            idle = doctor(KMSKEYS, *args)
            (said,) = [f for f in idle["findings"] if f["check"] == "refresh"]
            assert said["level"] == "info" and "no refresher runs" in said["message"], said
            # A key answered and recorded: now one waits for a renewal that nothing makes.
            name = unique("refreshed")
            install.deploy(name, install.blob(b"kmst-refresh", name))
            assert install.get(name) == b"kmst-refresh"
            found = doctor(KMSKEYS, *args)
            (item,) = [f for f in broken(found) if f["check"] == "refresh"]
            assert "no refresher runs" in item["message"] and "refresh --config" in item["fix"]
            assert _shell(item["fix"]).returncode == 0
            deadline = time.monotonic() + 30
            while True:
                after = doctor(KMSKEYS, *args)
                ok = [f for f in after["findings"] if f["check"] == "refresh"]
                if (ok and ok[0]["level"] == "ok") or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert ok and ok[0]["message"] == "refresh_ahead is on and a refresher runs", after
        finally:
            for pid in _refreshers(install.config):
                os.kill(pid, 15)
