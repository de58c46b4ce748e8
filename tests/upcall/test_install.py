"""install writes one request-key rule naming this installation; uninstall removes exactly that."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from resolver.install import REQUEST_KEY_D, rule_path
from tests.support.names import unique, unique_prefix
from tests.upcall.conftest import RESOLVER, Install, run_resolver

pytestmark = pytest.mark.upcall


def test_rule_names_this_installation_and_the_fixed_argv(resolver_install: Install) -> None:
    rule = rule_path(resolver_install.prefix).read_text().splitlines()[-1]
    assert rule == (
        f"create user {resolver_install.prefix}:* * {RESOLVER} handle "
        f"--config {resolver_install.config} %k %d %u %g %T %P %S"
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
        assert f'prefix = "{prefix}"' in config.read_text()
        # The default blob_dir is the real /etc/kmskeys/secrets: point it into our tree.
        blob_dir = root / "etc" / "secrets"
        config.write_text(config.read_text() + f'blob_dir = "{blob_dir}"\n')
        assert run_resolver("install", "--config", str(config)).returncode == 0
        assert blob_dir.is_dir() and stat.S_IMODE(blob_dir.stat().st_mode) == 0o755
        # Something the administrator added is never removed.
        (root / "keep.txt").write_text("mine")
        done = run_resolver("uninstall", "--config", str(config), "--prefix", prefix)
        assert done.returncode == 0, done.stderr
        assert not rule_path(prefix).exists()
        assert not blob_dir.exists()
        # The config changed since install (blob_dir was added): it stays, and says so.
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
    blob_dir = Path("/etc/kmskeys/secrets")
    had_blob_dir = blob_dir.exists()
    try:
        assert run_resolver("install", "--config", str(config), "--prefix", prefix).returncode == 0
        assert blob_dir.is_dir()
        done = run_resolver("uninstall", "--config", str(config), "--prefix", prefix)
        assert done.returncode == 0, done.stderr
        assert not (root / "etc").exists()
        assert blob_dir.exists() == had_blob_dir
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
