"""install writes one request-key rule naming this installation; uninstall removes exactly that."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

import resolver
from resolver.install import REQUEST_KEY_D, rule_path
from tests.support.names import unique, unique_prefix
from tests.upcall.conftest import RESOLVER, Install, run_resolver

pytestmark = pytest.mark.upcall


def test_rule_names_this_installation_and_the_fixed_argv(resolver_install: Install) -> None:
    rule = rule_path(resolver_install.prefix).read_text().splitlines()[-1]
    settings = resolver_install.settings
    gate = Path(resolver.__file__).parent / "kmskeys-gate"  # tests/upcall/test_gate.py
    daemon = settings.get("warm_socket") or "-"  # the resolver daemon's socket, if any
    assert rule == (
        f"create user {resolver_install.prefix}:* * {gate} {settings['state_dir']} 4 "
        f"{settings['negative_ttl']} {settings['syslog_socket']} 10 {daemon} 500 1 "
        f"%k %u %T %P %S -- {RESOLVER} handle --config {resolver_install.config} "
        "%k %d %u %g %T %P %S"
    )


def test_install_is_idempotent(resolver_install: Install) -> None:
    path = rule_path(resolver_install.prefix)
    before = path.read_text()
    done = run_resolver(
        "install", "--config", str(resolver_install.config), "--prefix", resolver_install.prefix
    )
    assert done.returncode == 0, done.stderr
    assert "already up to date" in done.stdout
    assert path.read_text() == before


def test_install_refuses_a_prefix_other_than_the_configs(resolver_install: Install) -> None:
    done = run_resolver("install", "--config", str(resolver_install.config), "--prefix", "other")
    assert done.returncode == 1
    assert "differs" in done.stderr
    assert not rule_path("other").exists()


def test_install_creates_what_is_missing_and_uninstall_removes_exactly_that() -> None:
    root = Path(tempfile.mkdtemp(prefix=unique("install") + "-"))
    prefix = unique_prefix()
    config = root / "etc" / "resolver.toml"
    try:
        done = run_resolver("install", "--config", str(config), "--prefix", prefix)
        assert done.returncode == 0, done.stderr
        st = config.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)
        # A config of its own gets a blob_dir of its own, next to it.
        blob_dir = root / "etc" / "secrets"
        assert f'prefix = "{prefix}"' in config.read_text()
        assert f'blob_dir = "{blob_dir}"' in config.read_text()
        assert blob_dir.is_dir() and stat.S_IMODE(blob_dir.stat().st_mode) == 0o755
        assert run_resolver("install", "--config", str(config)).returncode == 0
        # Something the administrator added or changed is never removed.
        (root / "keep.txt").write_text("mine")
        config.write_text(config.read_text() + "# edited by the administrator\n")
        done = run_resolver("uninstall", "--config", str(config), "--prefix", prefix)
        assert done.returncode == 0, done.stderr
        assert not rule_path(prefix).exists()
        assert not blob_dir.exists()
        assert config.exists() and "kept" in done.stdout
        assert (root / "keep.txt").exists()
        again = run_resolver("uninstall", "--config", str(config), "--prefix", prefix)
        assert again.returncode == 0 and "nothing to do" in again.stdout
    finally:
        rule_path(prefix).unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def test_uninstall_removes_an_unchanged_config_and_its_directory() -> None:
    root = Path(tempfile.mkdtemp(prefix=unique("install") + "-"))
    prefix = unique_prefix()
    config = root / "etc" / "resolver.toml"
    default_blob_dir = Path("/etc/kmskeys/secrets")
    had_default_blob_dir = default_blob_dir.exists()
    try:
        assert run_resolver("install", "--config", str(config), "--prefix", prefix).returncode == 0
        # Never the default install's blob_dir for another config (it used to be created).
        assert default_blob_dir.exists() == had_default_blob_dir
        done = run_resolver("uninstall", "--config", str(config), "--prefix", prefix)
        assert done.returncode == 0, done.stderr
        assert not (root / "etc").exists()
    finally:
        rule_path(prefix).unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def test_uninstall_leaves_a_foreign_rule_file_alone() -> None:
    prefix = unique_prefix()
    path = rule_path(prefix)
    path.write_text(f"create user {prefix}:* * /bin/false\n")
    try:
        done = run_resolver("uninstall", "--config", "/nonexistent/kmst.toml", "--prefix", prefix)
        assert done.returncode == 1 and "not written by" in done.stderr
        assert path.exists()
    finally:
        path.unlink()


def test_rule_files_live_in_request_key_d(resolver_install: Install) -> None:
    assert rule_path("kms") == REQUEST_KEY_D / "kmskeys.conf"
    assert rule_path(resolver_install.prefix).parent == REQUEST_KEY_D
    assert os.access(RESOLVER, os.X_OK)


def test_the_obsolete_backend_key_is_accepted_and_reported(extra_install: Any) -> None:
    # `backend = "kms"` was validated and never read: a config that has it keeps working, and
    # `check` (doctor's source) says to remove it; any other value stays an error.
    import json

    with extra_install(backend="kms") as install:
        name = unique("obsolete")
        assert install.get(name, install.blob(b"kmst-obsolete", name)) == b"kmst-obsolete"
        done = run_resolver("check", "--config", str(install.config))
        report = json.loads(done.stdout)
        assert report["config"]["ok"] and "backend" in report["config"]["obsolete"]
        assert "remove it" in report["config"]["obsolete"]["backend"]
        assert "backend" not in report["known_keys"]
        assert report["gate"]["ok"] and report["gate"]["stamp"] == report["gate"]["expected"]
        text = install.config.read_text().replace('backend = "kms"', 'backend = "stored"')
        install.config.write_text(text)
        done = run_resolver("check", "--config", str(install.config))
        report = json.loads(done.stdout)
        assert not report["config"]["ok"] and "backend is obsolete" in report["config"]["error"]


def _second_config(root: Path, values: dict[str, Any]) -> Path:
    from tests.stored.harness import write_config

    config = root / "other.toml"
    write_config(config, values)
    return config


def test_a_second_install_sharing_the_hosts_things_is_refused() -> None:
    from tests.stored.harness import stored_installed

    with stored_installed(rules="both") as first:
        root = Path(tempfile.mkdtemp(prefix=unique("second") + "-"))
        os.chmod(root, 0o755)
        prefix = unique_prefix()
        shared = {
            "prefix": prefix,
            "stored_prefix": first.stored_prefix,
            "keystore_dir": first.keystore,
            "state_dir": first.settings["state_dir"],
            "blob_dir": root / "blobs",
            "syslog_socket": first.log.path,
        }
        try:
            config = _second_config(root, shared)
            done = run_resolver("install", "--config", str(config), "--rules", "both")
            assert done.returncode == 1
            where = f"{rule_path(first.prefix)} (config {first.config})"
            for setting, value in (
                ("stored_prefix", repr(first.stored_prefix)),
                ("state_dir", first.settings["state_dir"]),
                ("keystore_dir", first.keystore),
            ):
                assert f"{setting} {value} " in done.stderr, done.stderr
                assert f"set {setting} in {config}" in done.stderr, done.stderr
            assert where in done.stderr
            # Nothing written: no rule, no directory, the config untouched.
            assert not rule_path(prefix).exists()
            assert not (root / "blobs").exists()
            # With things of its own, the second install goes in beside the first.
            own = {
                **shared,
                "stored_prefix": unique_prefix(),
                "keystore_dir": root / "keystore",
                "state_dir": root / "state",
            }
            config = _second_config(root, own)
            done = run_resolver("install", "--config", str(config), "--rules", "both")
            assert done.returncode == 0, done.stderr
            # Both answer: each its own stored: prefix.
            assert len(first.request(unique("both"))) == 32
            desc = f"{own['stored_prefix']}:{unique('both')}"
            from kmskeys import Key

            assert len(Key.request(desc, "32").read()) == 32
        finally:
            run_resolver("uninstall", "--config", str(root / "other.toml"), "--prefix", prefix)
            rule_path(prefix).unlink(missing_ok=True)
            shutil.rmtree(root, ignore_errors=True)


def test_a_config_install_writes_beside_the_default_one_claims_nothing_shared() -> None:
    root = Path(tempfile.mkdtemp(prefix=unique("install") + "-"))
    prefix = unique_prefix()
    config = root / "etc" / "resolver.toml"
    try:
        done = run_resolver("install", "--config", str(config), "--prefix", prefix)
        assert done.returncode == 0, done.stderr
        text = config.read_text()
        assert f'state_dir = "/run/kmskeys-{prefix}"' in text
        assert f'keystore_dir = "/var/lib/kmskeys-{prefix}"' in text
        assert f'stored_prefix = "{prefix}-stored"' in text
        # The record: in the rule file and the state_dir, with the options and the programs.
        from kmskeys.rules import RECORD_FILE, parse_record

        record = parse_record(rule_path(prefix).read_text())
        assert record is not None
        assert (record.prefix, record.config, record.rules) == (prefix, str(config), "kms")
        assert record.resolver == str(RESOLVER) and record.routed == (prefix,)
        kept = Path(f"/run/kmskeys-{prefix}") / RECORD_FILE
        assert parse_record(kept.read_text()) == record
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        done = run_resolver("uninstall", "--config", str(config), "--prefix", prefix)
        assert done.returncode == 0, done.stderr
        assert not kept.exists() and not kept.parent.exists()
    finally:
        rule_path(prefix).unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(f"/run/kmskeys-{prefix}", ignore_errors=True)


def test_a_second_install_on_the_same_warm_socket_is_refused(extra_install: Any) -> None:
    sock = Path(tempfile.mkdtemp(prefix=unique("warm") + "-")) / "warm.sock"
    try:
        with extra_install(warm_socket=sock) as first:
            root = Path(tempfile.mkdtemp(prefix=unique("second") + "-"))
            os.chmod(root, 0o755)
            prefix = unique_prefix()
            values = {"prefix": prefix, "state_dir": root / "state", "warm_socket": sock}
            try:
                config = _second_config(root, values)
                done = run_resolver("install", "--config", str(config))
                assert done.returncode == 1
                assert f"warm_socket {sock} is the one of {rule_path(first.prefix)}" in done.stderr
                assert not rule_path(prefix).exists()
            finally:
                rule_path(prefix).unlink(missing_ok=True)
                shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)


def test_a_new_config_never_takes_over_an_installed_prefix(resolver_install: Install) -> None:
    # A second install that forgot --prefix P: install would create a config for the first
    # install's prefix; refused, and the first install's rule left as it is.
    root = Path(tempfile.mkdtemp(prefix=unique("install") + "-"))
    config = root / "other.toml"
    rule = rule_path(resolver_install.prefix)
    before = rule.read_text()
    try:
        done = run_resolver("install", "--config", str(config), "--prefix", resolver_install.prefix)
        assert done.returncode == 1
        assert f"is installed with config {resolver_install.config}" in done.stderr, done.stderr
        assert rule.read_text() == before and not config.exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)
