"""`kmskeys doctor` explains the installed resolver, one line and a fix per finding.

Each broken set-up is made for real (files, the rule, keyrings, a seccomp filter), doctor's fix
is pasted into a shell as printed, and doctor then passes. Doctor runs in a network namespace
of its own (`unshare --net`): IMDS is unreachable there, so the host's network does not decide
the IMDS finding (tests/netns covers the firewall).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kmskeys import Key, KeyNotFoundError, Keyring, get_secret
from kmskeys.doctor import main as doctor_main
from kmskeys.doctor.rule import check_rule
from kmskeys.doctor.syslog import listens
from kmskeys.upcall_probe import REQUEST_KEY_D, become_fsuid, nobody
from resolver.install import rule_line, rule_path
from tests.support.names import unique, unique_prefix
from tests.support.request_key_rule import recorded_request
from tests.support.requester import as_user
from tests.support.seccomp import deny_key_syscalls
from tests.upcall.conftest import KMSKEYS, RESOLVER, Install

pytestmark = pytest.mark.upcall

BIN = str(KMSKEYS.parent)
# The one WARN without a command: a property of this kernel (docs/reliability.md).
NO_COMMAND = {"upcall"}


def _doctor_argv(*args: str) -> list[str]:
    return ["unshare", "--net", str(KMSKEYS), "doctor", *args]


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _doctor_argv(*args), check=False, capture_output=True, text=True, timeout=30
    )


def _shell(script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Paste `script` into a shell, line by line, as an operator does (this venv on PATH).

    bash reads a pipe one byte at a time, so a pasted `exec ...` that starts a new shell on the
    same terminal (stdin) runs the lines that follow it, as at a terminal.
    """
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "SHELL": "/bin/bash",
    }
    return subprocess.run(
        ["bash", "-e"],
        input=script + "\n",
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        **kwargs,
    )


def report(*args: str, before: str = "", **kwargs: Any) -> dict[str, Any]:
    """doctor --json's report, after the shell lines `before` (in the same shell)."""
    argv = " ".join(_quote(a) for a in _doctor_argv(*args, "--json"))
    done = _shell(f"{before}\n{argv} || true", **kwargs)
    start = done.stdout.rfind('{\n  "ok"')  # after whatever the lines before printed
    assert start >= 0, (done.stdout, done.stderr)
    found: dict[str, Any] = json.loads(done.stdout[start:])
    return found


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def problems(found: dict[str, Any], checks: set[str] | None = None) -> list[dict[str, Any]]:
    """The FAIL and warn findings (of `checks`, when given)."""
    return [
        f
        for f in found["findings"]
        if f["level"] in ("FAIL", "warn") and (checks is None or f["check"] in checks)
    ]


def fixes(found: dict[str, Any], checks: set[str]) -> str:
    """The fix commands of these checks' problems, one per line; each must have one."""
    broken = problems(found, checks)
    assert broken, found
    for item in broken:
        assert item["fix"], item
    return "\n".join(item["fix"] for item in broken)


def paste_and_pass(args: tuple[str, ...], checks: set[str], before: str = "") -> dict[str, Any]:
    """Doctor finds these checks broken; the pasted fixes make it pass: the report after."""
    broken = report(*args, before=before)
    assert not broken["ok"] or problems(broken, checks), broken
    # The same shell: the broken set-up, the fixes as printed, doctor again (bash -e: a fix
    # that fails stops it before doctor).
    after = report(*args, before=f"{before}\n{fixes(broken, checks)}")
    assert problems(after, checks) == [], after
    for item in problems(after):
        assert item["fix"] or item["check"] in NO_COMMAND, item
    assert after["ok"], after
    return broken


def _args(install: Install) -> tuple[str, ...]:
    return ("--prefix", install.prefix, "--config", str(install.config))


def test_doctor_passes_a_good_install_and_json_says_the_same(resolver_install: Install) -> None:
    done = _doctor(*_args(resolver_install))
    assert done.returncode == 0, done.stdout
    assert f"ok   config {resolver_install.config} is root-owned and safe" in done.stdout
    assert f"ok   blob_dir {resolver_install.blob_dir} is root-owned and safe" in done.stdout
    assert f"ok   rule {rule_path(resolver_install.prefix)} runs {RESOLVER}" in done.stdout
    assert "key quota" in done.stdout and "IMDS" in done.stdout
    assert f"syslog at {resolver_install.log.path}" in done.stdout
    found = report(*_args(resolver_install))
    assert found["ok"] is True
    lines = [
        f"{f['level']:<4} {f['message']}" + (f"; fix: {f['fix']}" if f["fix"] else "")
        for f in found["findings"]
    ]
    # The same findings, but for the ones that measure this very moment.
    volatile = ("key quota", "session keyring")
    assert [x for x in lines if not any(v in x for v in volatile)] == [
        x for x in done.stdout.splitlines() if not any(v in x for v in volatile)
    ]
    # Without --config, doctor checks the config the rule names.
    alone = report("--prefix", resolver_install.prefix)
    assert alone["ok"] is True
    assert any(str(resolver_install.config) in f["message"] for f in alone["findings"])


def test_no_rule_for_the_prefix_the_fix_installs_one() -> None:
    # The newcomer who never ran install, or whose app uses another prefix.
    root = Path(tempfile.mkdtemp(prefix=unique("doctor") + "-"))
    os.chmod(root, 0o755)
    prefix = unique_prefix()
    config = root / "etc" / "resolver.toml"
    try:
        broken = paste_and_pass(("--prefix", prefix, "--config", str(config)), {"rule", "config"})
        rule = next(f for f in broken["findings"] if f["check"] == "rule")
        assert "fail with ENOKEY, logged nowhere" in rule["message"]
        assert rule["fix"] == f"{RESOLVER} install --config {config} --prefix {prefix}"
        assert rule_path(prefix).exists()
    finally:
        subprocess.run(
            [str(RESOLVER), "uninstall", "--config", str(config), "--prefix", prefix],
            check=False,
            capture_output=True,
        )
        rule_path(prefix).unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def test_a_rule_in_another_file_is_found(resolver_install: Install) -> None:
    # `install --rules both` puts the stored: prefix's rule in the kms prefix's file.
    stored = unique_prefix()
    path = REQUEST_KEY_D / f"{unique('both')}.conf"
    line = rule_line(stored, RESOLVER, resolver_install.config)
    path.write_text(f"{line}\n")
    try:
        findings, rule = check_rule(stored, None)
    finally:
        path.unlink()
    assert rule is not None and rule.path == path and rule.config == resolver_install.config
    assert [f.level for f in findings] == ["ok"], findings


@contextlib.contextmanager
def _restored(*paths: Path) -> Iterator[None]:
    saved = {p: (p.read_bytes(), os.stat(p)) for p in paths}
    try:
        yield
    finally:
        for path, (data, st) in saved.items():
            path.write_bytes(data)
            os.chown(path, st.st_uid, st.st_gid)
            os.chmod(path, st.st_mode & 0o7777)


def test_config_mistakes_each_fix_makes_doctor_pass(extra_install: Callable[..., Any]) -> None:
    with extra_install() as install:
        config = install.config
        text = config.read_text()
        other = install.root / "other.toml"
        cases: list[tuple[str, Callable[[], None], set[str]]] = [
            ("mode", lambda: os.chmod(config, 0o666), {"config"}),
            (
                "typo",
                # The newcomer: `endpoint =`, which the resolver refuses.
                lambda: config.write_text(text.replace("endpoint_url =", "endpoint =")),
                {"config"},
            ),
            ("bad value", lambda: config.write_text(text + 'ttl = "300"\n'), {"config"}),
            ("rule mode", lambda: os.chmod(rule_path(install.prefix), 0o666), {"rule"}),
            (
                "prefix",
                lambda: config.write_text(
                    text.replace(f'prefix = "{install.prefix}"', 'prefix = "elsewhere"')
                ),
                {"config"},
            ),
        ]
        for label, breakage, checks in cases:
            with _restored(config, rule_path(install.prefix)):
                breakage()
                broken = paste_and_pass(_args(install), checks)
                (item,) = problems(broken, checks)
                assert item["level"] == "FAIL", (label, item)
                if label == "typo":
                    assert "unknown key 'endpoint'" in item["message"]
                    assert "endpoint_url" in item["fix"]
                    assert "endpoint_url =" in config.read_text()
        # The rule names one config, doctor is asked about another: the fix points the rule at
        # the one asked about (with --config: run as printed, it used to make a new default).
        shutil.copy(config, other)
        try:
            broken = paste_and_pass(("--prefix", install.prefix, "--config", str(other)), {"rule"})
            (item,) = problems(broken, {"rule"})
            assert f"names config {config}, not {other}" in item["message"]
            assert f"--config {other} --prefix {install.prefix}" in item["fix"]
        finally:
            assert _shell(f"{RESOLVER} install --config {config}").returncode == 0


def test_gate_settings_the_config_changed_since_install(extra_install: Callable[..., Any]) -> None:
    # The gate gets the per-uid limit on the rule line: a config edited after install leaves it
    # behind, doctor says so, and its fix (install again) copies the new value into the rule.
    with extra_install() as install, _restored(install.config, rule_path(install.prefix)):
        install.config.write_text(install.config.read_text() + "max_concurrent_per_uid = 7\n")
        broken = paste_and_pass(_args(install), {"rule"})
        (item,) = problems(broken, {"rule"})
        assert item["level"] == "warn", item
        assert "kmskeys-gate" in item["message"] and " 7 " in item["message"], item
        assert " 7 " in rule_path(install.prefix).read_text()


def test_blob_file_mistakes_each_fix_makes_doctor_pass(extra_install: Callable[..., Any]) -> None:
    with extra_install() as install:
        good = unique("good")
        install.deploy(good, install.blob(b"fine", good))
        # Spaces: no request can name it; the fix renames it to the name its blob was made for.
        install.deploy("bad name", install.blob(b"x", "bad-name"))
        install.deploy(unique("garbage"), "kmsk1:not-a-blob")
        writable, foreign, linked = unique("writable"), unique("foreign"), unique("link")
        install.deploy(writable, install.blob(b"x", writable), mode=0o666)
        os.chown(install.deploy(foreign, install.blob(b"x", foreign)), 65534, 65534)
        install.deploy(unique("misnamed"), install.blob(b"x", good))  # made for another name
        nested = install.blob_dir / "team"
        nested.mkdir()
        os.chmod(nested, 0o777)
        target = install.root / f"{linked}.kms"
        target.write_text(install.blob(b"linked", linked))
        (install.blob_dir / f"{linked}.kms").symlink_to(target)
        broken = paste_and_pass(_args(install), {"blobs", "blob_dir"})
        messages = " | ".join(f["message"] for f in problems(broken))
        assert "not a valid secret name" in messages
        assert "writable by group or others" in messages and "owned by uid 65534" in messages
        assert "a symbolic link" in messages and "not a blob the resolver can parse" in messages
        assert f"blob was encrypted for '{good}', not 'kmst-" in messages
        assert len(problems(broken, {"blobs"})) == 7, messages
        # Fixed, not thrown away: the good blob and the link's copy still resolve.
        assert install.get(good) == b"fine"
        assert install.get(linked) == b"linked"
        assert install.get("bad-name") == b"x"
        os.rmdir(nested)
        shutil.rmtree(install.blob_dir)
        paste_and_pass(_args(install), {"blob_dir"})
        assert install.blob_dir.is_dir()


def test_a_blob_for_a_key_the_config_does_not_list(extra_install: Callable[..., Any]) -> None:
    with extra_install() as install:
        other = install.kms().create_key()["KeyMetadata"]["Arn"]
        name = unique("otherkey")
        import encryptor

        install.deploy(name, encryptor.encrypt(b"x", name, other, client=install.kms()).to_text())
        broken = paste_and_pass(_args(install), {"blobs"})
        (item,) = problems(broken, {"blobs"})
        assert f"{other} is not in key_arns" in item["message"]
        assert install.get(name) == b"x"


def test_the_resolver_the_rule_runs_lacks_its_dependencies(
    extra_install: Callable[..., Any], tmp_path: Path
) -> None:
    # A resolver environment with kmskeys but without botocore/cryptography: its own check
    # says so, and the fix points the rule at this installation, which has them.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = tmp_path / "site"
    site.mkdir()
    repo = Path(__file__).resolve().parents[2]
    import _cffi_backend
    import cffi

    for source in (repo / "kmskeys", repo / "resolver", Path(cffi.__file__).parent):
        (site / source.name).symlink_to(source)
    backend = Path(_cffi_backend.__file__)
    (site / backend.name).symlink_to(backend)
    (next(venv.glob("lib/python*/site-packages")) / "kmst.pth").write_text(f"{site}\n")
    program = venv / "bin" / "kmskeys-resolver"
    program.write_text(
        f"#!{venv}/bin/python\nimport sys\nfrom resolver.cli import main\nsys.exit(main())\n"
    )
    program.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    with extra_install() as install:
        rule = rule_path(install.prefix)
        original = rule.read_text()
        rule.write_text(rule_line(install.prefix, program, install.config) + "\n")
        try:
            broken = paste_and_pass(_args(install), {"dependencies"})
            (item,) = problems(broken, {"dependencies"})
            assert "lacks a dependency" in item["message"] and "botocore" in item["message"]
            assert item["fix"].startswith(f"{RESOLVER} install --config {install.config}")
            assert str(RESOLVER) in rule.read_text()
        finally:
            rule.write_text(original)


def test_a_cached_failure_is_named_and_the_fix_flushes_it(resolver: Install) -> None:
    name = unique("cachedfail")
    with pytest.raises(KeyNotFoundError) as caught:
        resolver.get(name)  # no NAME.kms: refused with ENOKEY, cached for negative_ttl
    flush = f"kmskeys flush {name} --prefix {resolver.prefix}"
    assert "cached failure (key " in str(caught.value) and f"`{flush}` to retry now" in str(
        caught.value
    )
    assert "expires in " in str(caught.value)
    resolver.log.wait_for(name)
    broken = paste_and_pass(_args(resolver), {"cached"})
    (item,) = problems(broken, {"cached"})
    assert item["message"].startswith(f"{resolver.description(name)}: cached failure")
    assert item["fix"] == flush
    # Flushed: the very next request asks the resolver again (a second log line).
    resolver.deploy(name, resolver.blob(b"now", name))
    assert resolver.get(name) == b"now"


def test_a_session_keyring_owned_by_another_uid_fails(resolver: Install) -> None:
    # As after `su` or a joined named keyring: this shell's session keyring is another uid's.
    squatted = "keyctl new_session >/dev/null\nkeyctl chown @s 65534"
    broken = paste_and_pass(_args(resolver), {"session"}, before=squatted)
    (item,) = problems(broken, {"session"})
    assert item["level"] == "FAIL" and "owned by uid 65534, not by uid 0" in item["message"]
    assert item["fix"].startswith("exec keyctl session -")


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS], ids=["EPERM", "ENOSYS"])
def test_blocked_keyctl_is_named(resolver_install: Install, err: int) -> None:
    found = report(*_args(resolver_install), preexec_fn=lambda: deny_key_syscalls(err))
    (item,) = problems(found, {"keyctl"})
    assert item["level"] == "FAIL" and errno.errorcode[err] in item["message"]
    assert "Docker's default profile" in item["message"] and "docs/containers.md" in item["fix"]
    # Not blamed on anything else: no finding about keyrings it could not read.
    assert not [f for f in found["findings"] if f["check"] in ("session", "cached")]
    # The fix is the container's: without the filter, the same doctor passes.
    assert report(*_args(resolver_install))["ok"] is True


def test_syslog_socket_missing(extra_install: Callable[..., Any]) -> None:
    # A test-only syslog path (the host's /dev/log stays untouched).
    with extra_install(syslog_socket="/run/kmst-no-such-syslog.sock") as install:
        found = report(*_args(install))
        (item,) = [f for f in found["findings"] if f["check"] == "syslog"]
        if listens(Path("/dev/log")):
            assert item["level"] == "warn" and "/dev/log" in item["fix"]
            paste_and_pass(_args(install), {"syslog"})
        else:
            # Nothing to point it at: the handler's lines go to /dev/kmsg, and doctor says so.
            assert item["level"] == "info" and "go to /dev/kmsg" in item["message"], item


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
    done = _doctor(*_args(resolver_install))
    assert _probe_rules() <= before  # the throwaway rule is gone
    line = _upcall_line(done.stdout)
    if ran and got:
        assert line.startswith("ok   request-key runs for root and for a non-root requester"), line
    else:
        assert line.startswith("warn request-key does not run for non-root requesters"), line
        assert f"uid {uid}: no (request_key: ENOENT; request-key never ran)" in line, line
        assert "misses of apps running as non-root never resolve" in line, line
        assert "resolve their secrets as root on their behalf" in line, line


def test_doctor_as_non_root_says_what_it_cannot_tell(resolver_install: Install) -> None:
    def doctor() -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            doctor_main(list(_args(resolver_install)))
        return out.getvalue()

    # A real non-root euid, in process: doctor decides by geteuid(). Its IMDS probe runs in a
    # network namespace of the child's own.
    result = as_user("nobody", doctor, mode="setuid", own_network=True)
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
