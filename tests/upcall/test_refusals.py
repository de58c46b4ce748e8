"""Every bad request is answered with the errno of its class, before anything unsafe is opened."""

from __future__ import annotations

import base64
import os
import time

import pytest

from kmskeys import (
    InvalidArgumentError,
    Key,
    KeyNotFoundError,
    KeyRejectedError,
    cli,
    get_secret,
)
from tests.support.names import unique
from tests.support.ttl import gone_after
from tests.upcall.conftest import Install

pytestmark = pytest.mark.upcall


def test_unknown_name_is_enokey(resolver: Install) -> None:
    name = unique("missing")
    with pytest.raises(KeyNotFoundError) as caught:
        resolver.get(name)
    assert "journalctl -t kmskeys-resolver" in str(caught.value)
    line = resolver.log.wait_for(name)
    assert "outcome=unknown" in line and "errno=ENOKEY" in line


@pytest.mark.parametrize(
    "bad",
    ["../outside", "sub/../../outside", "./outside", "sub//x", "/abs", "-x", "a b", "x/.."],
)
def test_traversal_and_invalid_names_are_refused_before_any_open(
    resolver: Install, bad: str
) -> None:
    # A valid blob for the name waits outside blob_dir: reaching it would be a success.
    outside = resolver.root / "outside.kms"
    outside.write_text(resolver.blob(b"escaped", "outside"))
    with pytest.raises(KeyRejectedError):
        Key.request(f"{resolver.prefix}:{bad}", b"")
    lines = resolver.log.drain()
    assert len(lines) == 1 and "outcome=refused" in lines[0], lines
    assert "secret name" in lines[0]
    assert resolver.decrypts() == 0


def test_symlink_out_of_blob_dir_is_refused(resolver: Install) -> None:
    name = unique("link")
    target = resolver.root / f"{name}.kms"
    target.write_text(resolver.blob(b"escaped", name))
    (resolver.blob_dir / f"{name}.kms").symlink_to(target)
    with pytest.raises(KeyRejectedError):
        resolver.get(name)
    assert "outcome=refused" in resolver.log.wait_for(name)
    assert resolver.decrypts() == 0


def test_symlinked_directory_inside_blob_dir_is_refused(resolver: Install) -> None:
    name = unique("dirlink")
    real = resolver.root / "elsewhere"
    real.mkdir(mode=0o755, exist_ok=True)
    (real / f"{name}.kms").write_text(resolver.blob(b"escaped", f"via/{name}"))
    (resolver.blob_dir / "via").symlink_to(real)
    try:
        with pytest.raises(KeyRejectedError):
            resolver.get(f"via/{name}")
    finally:
        (resolver.blob_dir / "via").unlink()


def test_fifo_blob_is_refused_without_blocking(resolver: Install) -> None:
    name = unique("fifo")
    os.mkfifo(resolver.blob_dir / f"{name}.kms", 0o644)
    start = time.monotonic()
    with pytest.raises(KeyRejectedError):
        resolver.get(name)
    assert time.monotonic() - start < 3  # the session deadline is 4 s
    assert "not a regular file" in resolver.log.wait_for(name)


@pytest.mark.parametrize(
    ("mode", "owner", "why"),
    [
        (0o664, 0, "writable by group"),
        (0o646, 0, "writable by group or others"),
        (0o644, 65534, "uid 65534"),
    ],
)
def test_unsafe_blob_file_is_refused(resolver: Install, mode: int, owner: int, why: str) -> None:
    name = unique("unsafe")
    path = resolver.deploy(name, resolver.blob(b"x", name), mode=mode)
    os.chown(path, owner, -1)
    with pytest.raises(KeyRejectedError):
        resolver.get(name)
    assert why in resolver.log.wait_for(name)
    assert resolver.decrypts() == 0


@pytest.mark.parametrize(
    "callout",
    [
        b"garbage",
        b"kmsk1:!!!!",
        b"kmsk9:AAAA",
        b"--config=/etc/passwd",
        b"\xff\xfe not ascii",
        base64.b64encode(b"raw kms ciphertext is legacy"),
    ],
)
def test_malformed_callouts_are_refused(resolver: Install, callout: bytes) -> None:
    name = unique("malformed")
    with pytest.raises(KeyRejectedError):
        resolver.get(name, callout)
    assert "outcome=refused" in resolver.log.wait_for(name)
    assert resolver.decrypts() == 0


def test_oversized_callout_never_reaches_the_resolver(resolver: Install) -> None:
    name = unique("huge")
    # callout info is capped at PAGE_SIZE-1 bytes: the kernel refuses 4096 with EINVAL itself.
    with pytest.raises(InvalidArgumentError):
        resolver.get(name, b"A" * 4096)
    assert resolver.log.drain() == []


def test_oversized_blob_file_is_refused(resolver: Install) -> None:
    name = unique("bigfile")
    resolver.deploy(name, "kmsk1:" + "A" * (70 * 1024))
    with pytest.raises(KeyRejectedError):
        resolver.get(name)
    assert "larger than" in resolver.log.wait_for(name)


def test_legacy_blob_refused_unless_the_config_allows_it(resolver: Install, extra_install) -> None:  # type: ignore[no-untyped-def]
    import encryptor

    name = unique("legacy")
    legacy = encryptor.encrypt_raw(b"old style", resolver.key_arn, client=resolver.kms()).to_text()
    with pytest.raises(KeyRejectedError):
        resolver.get(name, legacy)
    assert "legacy" in resolver.log.wait_for(name)
    with extra_install(allow_legacy_blobs=True) as permissive:
        assert permissive.get(name, legacy) == b"old style"
        assert "mode=legacy" in permissive.log.wait_for(name)
        # Legacy support does not weaken bound blobs: another name is still refused.
        with pytest.raises(KeyRejectedError):
            permissive.get(unique("legacy"), resolver.blob(b"bound", name))


@pytest.mark.parametrize("mode", [0o666, 0o664])
def test_group_or_world_writable_config_is_refused(extra_install, mode: int) -> None:  # type: ignore[no-untyped-def]
    with extra_install() as other:
        name = unique("config")
        text = other.blob(b"x", name)
        os.chmod(other.config, mode)
        try:
            with pytest.raises(KeyRejectedError):
                get_secret(name, text, prefix=other.prefix)
        finally:
            os.chmod(other.config, 0o644)
        # The config is unsafe, so its syslog_socket is not trusted either: nothing arrives here.
        assert other.log.drain() == []
        # Nor its negative_ttl: the refusal is cached for the built-in default, longer than the
        # config's, until an operator who fixed the file flushes it.
        time.sleep(gone_after(other.settings["negative_ttl"]))
        with pytest.raises(KeyRejectedError):
            get_secret(name, text, prefix=other.prefix)
        assert cli.main(["flush", name, "--prefix", other.prefix]) == 0
        assert get_secret(name, text, prefix=other.prefix) == b"x"


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_config_in_a_directory_others_can_write_is_refused(extra_install, mode: int) -> None:  # type: ignore[no-untyped-def]
    # Whoever may write the directory may swap or remove the config, even a root-owned 0644 one.
    with extra_install() as other:
        name = unique("configdir")
        text = other.blob(b"x", name)
        os.chmod(other.config.parent, mode)
        try:
            with pytest.raises(KeyRejectedError):
                get_secret(name, text, prefix=other.prefix)
        finally:
            os.chmod(other.config.parent, 0o755)
        assert cli.main(["flush", name, "--prefix", other.prefix]) == 0
        assert get_secret(name, text, prefix=other.prefix) == b"x"


def test_config_with_unknown_key_is_refused(extra_install) -> None:  # type: ignore[no-untyped-def]
    with extra_install() as other:
        name = unique("config")
        with other.config.open("a") as f:
            f.write("colour = 'blue'\n")
        with pytest.raises(KeyRejectedError):
            get_secret(name, other.blob(b"x", name), prefix=other.prefix)
