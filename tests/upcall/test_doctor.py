"""`kmskeys doctor` explains the installed resolver, one line and a fix per finding."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path

import pytest

from kmskeys import Key, Keyring, get_secret
from kmskeys.doctor import main as doctor_main
from kmskeys.upcall_probe import REQUEST_KEY_D, become_fsuid, nobody
from tests.support.names import unique, unique_prefix
from tests.support.request_key_rule import recorded_request
from tests.support.requester import as_user
from tests.upcall.conftest import KMSKEYS, Install

pytestmark = pytest.mark.upcall


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KMSKEYS), "doctor", *args], check=False, capture_output=True, text=True, timeout=30
    )


def test_doctor_passes_a_good_install(resolver_install: Install) -> None:
    done = _doctor("--prefix", resolver_install.prefix, "--config", str(resolver_install.config))
    assert done.returncode == 0, done.stdout
    assert f"ok   config {resolver_install.config} is root-owned and safe" in done.stdout
    assert f"ok   blob_dir {resolver_install.blob_dir} is root-owned and safe" in done.stdout
    assert "key quota" in done.stdout and "IMDS" in done.stdout


def test_doctor_flags_a_missing_rule_and_an_unsafe_blob_dir(resolver_install: Install) -> None:
    os.chmod(resolver_install.blob_dir, 0o777)
    try:
        done = _doctor("--prefix", unique_prefix(), "--config", str(resolver_install.config))
    finally:
        os.chmod(resolver_install.blob_dir, 0o755)
    assert done.returncode == 1
    assert "FAIL no rule" in done.stdout and "fix: kmskeys-resolver install" in done.stdout
    assert f"FAIL blob_dir {resolver_install.blob_dir} is writable" in done.stdout


def _probe_rules() -> set[Path]:
    return set(REQUEST_KEY_D.glob("kmskeys-probe-*"))


def _upcall_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if "non-root requester" in line)


def test_doctor_as_root_probes_upcalls_and_leaves_no_rule(
    resolver_install: Install, tmp_path: Path
) -> None:
    uid, gid = nobody()
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    ran, got = recorded_request(tmp_path, setpriv)  # the same question, asked with keyctl(1)
    before = _probe_rules()
    done = _doctor("--prefix", resolver_install.prefix, "--config", str(resolver_install.config))
    assert _probe_rules() <= before  # the throwaway rule is gone
    line = _upcall_line(done.stdout)
    if ran and got:
        assert line.startswith("ok   request-key runs for root and for a non-root requester"), line
    else:
        assert line.startswith("warn request-key does not run for non-root requesters"), line
        assert f"uid {uid}: no (request_key: ENOENT; request-key never ran)" in line, line
        assert "misses of apps running as non-root never resolve" in line, line
        assert "fix: resolve their secrets as root on their behalf" in line, line


def test_doctor_as_non_root_says_what_it_cannot_tell(resolver_install: Install) -> None:
    def doctor() -> str:
        out = io.StringIO()
        args = ["--prefix", resolver_install.prefix, "--config", str(resolver_install.config)]
        with contextlib.redirect_stdout(out):
            doctor_main(args)
        return out.getvalue()

    # A real non-root euid, in process: doctor decides by geteuid(), and the venv's interpreter
    # may not be executable by other users.
    result = as_user("nobody", doctor, mode="setuid")
    assert isinstance(result, dict) and "ok" in result, result
    lines = [line for line in result["ok"].splitlines() if "upcall probe" in line]
    assert lines == [
        "info upcall probe not run (its throwaway rule in /etc/request-key.d needs root): a miss "
        "that fails at once with ENOENT means request-key does not run for this user; run doctor "
        "as root to probe"
    ]
    assert "non-root requester" not in result["ok"]


def test_doctors_fix_root_resolves_for_the_uid_and_the_app_hits(resolver: Install) -> None:
    # What doctor advises where non-root upcalls are refused: root, acting for the app's uid
    # (ruid and fsuid set to it, euid 0), resolves the secret into that uid's user keyring. The
    # app, a real non-root process whose session keyring links its user keyring (pam_keyinit,
    # systemd KeyringMode=shared), then gets it as a kernel hit, with no upcall of its own.
    name = unique("prefetch")
    text = resolver.blob(b"prefetched", name)
    uid, gid = nobody()

    def prefetch() -> int:
        become_fsuid(uid, gid, real=True)
        ring = Keyring.user()
        # The handler sets the key's owner and mask through possession, which the kernel finds
        # by searching the requester's keyrings: the destination must be reachable from them.
        Keyring.session().link_key(ring.serial)
        get_secret(name, text, prefix=resolver.prefix, keyring=ring)
        return Key.request(resolver.description(name)).describe().uid

    def app() -> str:
        Keyring.session().link_key(Keyring.user().serial)
        return get_secret(name, text, prefix=resolver.prefix).decode()

    def forget() -> None:
        ring = Keyring.user()
        for key in ring.list():
            if key.describe().description == resolver.description(name):
                key.unlink(ring)

    try:
        assert as_user("root", prefetch) == {"ok": uid}, resolver.log.drain()
        assert as_user("nobody", app, mode="setuid") == {"ok": "prefetched"}
        assert resolver.decrypts() == 1
    finally:
        as_user("root", lambda: (become_fsuid(uid, gid, real=True), forget())[1])
