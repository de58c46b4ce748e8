"""The keystore under the real upcall: one entry per herd, crashes, damage, full disk, bad modes.

Each failure must reject (never leave the key unanswered), say why in one log line, and leave
every existing entry exactly as it was: an entry is never rewritten or regenerated.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kmskeys import Key, KeyRejectedError, Keyring, TemporarilyUnavailableError
from resolver.install import rule_line
from tests.stored.harness import StoredInstall, stored_installed, write_config
from tests.support.names import unique, unique_prefix
from tests.support.prereqs import REQUEST_KEY_D
from tests.upcall.harness import RESOLVER, run_resolver

pytestmark = pytest.mark.upcall

HERD = 50
ERR = "<83>"  # authpriv (10) * 8 + LOG_ERR (3)


def _digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def _temps(install: StoredInstall) -> list[Path]:
    return [p for p in install.files() if p.name.startswith(".tmp-")]


def test_fifty_parallel_first_requests_make_one_entry(stored: StoredInstall) -> None:
    name = unique("herd")
    desc = stored.description(name)
    gate_r, gate_w = os.pipe()
    children: list[tuple[int, int]] = []
    for _ in range(HERD):
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # each child: its own session keyring, so the kernel cannot share one upcall
            try:
                os.close(gate_w)
                os.close(out_r)
                Keyring.join_session()
                os.read(gate_r, 1)  # all start together
                os.write(out_w, _digest(Key.request(desc, "32").read()).encode())
            except BaseException as exc:
                os.write(out_w, f"{type(exc).__name__} {getattr(exc, 'errno', '')}".encode())
            finally:
                os._exit(0)
        os.close(out_w)
        children.append((pid, out_r))
    os.close(gate_r)
    os.close(gate_w)  # open the gate
    digests = []
    for pid, out_r in children:
        with os.fdopen(out_r, "rb") as pipe:
            digests.append(pipe.read().decode())
        os.waitpid(pid, 0)
    assert len(digests) == HERD and len(set(digests)) == 1, set(digests)
    assert stored.entries_of(name) == [stored.entry(name)]
    assert not _temps(stored)
    # The log may lose a line or two under a herd (the syslog socket's queue is short and the
    # resolver never blocks on it), but no request failed and at most one created the entry.
    lines = [line for line in stored.log.drain() if f" name={name} " in line]
    assert lines and all("outcome=ok" in line for line in lines)
    assert sum("source=keystore-new" in line for line in lines) <= 1


@contextmanager
def _killing_rule(install: StoredInstall) -> Iterator[str]:
    """A second prefix onto the same keystore whose handler is SIGKILLed at its link() call."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("tier 'upcall' cannot run here; missing: the 'strace' command (apt strace)")
    prefix = unique_prefix()
    config = install.root / f"killer-{prefix}.toml"
    write_config(config, {**install.settings, "prefix": unique_prefix(), "stored_prefix": prefix})
    line = rule_line(prefix, RESOLVER, config)
    # strace injects SIGKILL into the linkat() that would publish the entry: the worker dies
    # after writing and fsyncing its temp file, before the entry exists.
    injected = f"{strace} -f -qq -o /dev/null -e trace=linkat -e inject=linkat:signal=KILL"
    rule = REQUEST_KEY_D / f"{prefix}.conf"
    rule.write_text(line.replace(f" {RESOLVER} ", f" {injected} {RESOLVER} ", 1) + "\n")
    try:
        yield prefix
    finally:
        rule.unlink(missing_ok=True)
        config.unlink(missing_ok=True)


def test_sigkill_between_write_and_link_leaves_no_entry(stored: StoredInstall) -> None:
    name = unique("killed")
    with _killing_rule(stored) as killer, pytest.raises(TemporarilyUnavailableError):
        Key.request(f"{killer}:{name}", "32")
    line = stored.log.wait_for(name)
    assert "killed by signal SIGKILL" in line and "errno=EAGAIN" in line
    assert not stored.entry(name).exists()
    leftovers = _temps(stored)
    assert len(leftovers) == 1  # what the worker wrote, complete, never published
    # The next request succeeds and makes the one entry; the leftover is no entry of anything.
    Keyring.join_session()
    key = stored.request(name)
    assert "source=keystore-new" in stored.log.wait_for(name)
    Keyring.join_session()
    assert stored.request(name) == key
    # A leftover older than any handler can live is swept by the next creation in its directory
    # (the name's: here, a rotation).
    os.utime(leftovers[0], (time.time() - 3600, time.time() - 3600))
    config = ["stored", "--config", str(stored.config)]
    done = run_resolver(*config, "rotate", name, "--uid", "0")
    assert done.returncode == 0, done.stderr
    assert not leftovers[0].exists()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], id="bit-flip"),
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b + b"\0", id="extended"),
    ],
)
def test_corrupt_entry_is_refused_and_left_untouched(
    stored: StoredInstall, damage: Callable[[bytes], bytes]
) -> None:
    name = unique("corrupt")
    key = stored.request(name)
    entry = stored.entry(name)
    intact = entry.read_bytes()
    with entry.open("r+b") as f:  # damage in place: same inode, owner and mode
        f.write(damage(intact))
        f.truncate()
    damaged = entry.read_bytes()
    mtime = entry.stat().st_mtime_ns
    stored.log.wait_for(name)  # the creation's line, out of the way
    for qualifier in ("", "#latest", "#user#v1"):
        Keyring.join_session()
        with pytest.raises(KeyRejectedError):
            stored.request(name, "32", qualifier)
        line = stored.log.wait_for(name)
        assert line.startswith(ERR) and "is corrupt" in line and "never regenerated" in line
    assert entry.read_bytes() == damaged and entry.stat().st_mtime_ns == mtime
    assert stored.entries_of(name) == [entry]
    # Restored from a backup, the same key answers again.
    entry.write_bytes(intact)
    Keyring.join_session()
    assert stored.request(name) == key


def test_entry_of_another_name_is_refused(stored: StoredInstall) -> None:
    first, second = unique("swap-a"), unique("swap-b")
    stored.request(first)
    stored.request(second)
    entry = stored.entry(second)
    shutil.copyfile(stored.entry(first), entry)  # intact bytes, wrong place
    stored.log.wait_for(second)  # the creation's line, out of the way
    Keyring.join_session()
    with pytest.raises(KeyRejectedError):
        stored.request(second)
    assert f"it holds user:0/{first}#v1" in stored.log.wait_for(second)


@contextmanager
def _tmpfs(size: str) -> Iterator[Path]:
    if shutil.which("mount") is None:
        pytest.fail("tier 'upcall' cannot run here; missing: the 'mount' command (util-linux)")
    base = Path(tempfile.mkdtemp(prefix=unique("tmpfs") + "-"))
    os.chmod(base, 0o755)
    mnt = base / "keystore"
    mnt.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700,uid=0,gid=0", "tmpfs", str(mnt)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_disk_gives_eagain_and_keeps_entries(session_keyring: object) -> None:
    with _tmpfs("64k") as keystore, stored_installed(keystore=keystore) as small:
        kept_name, new_name = unique("kept"), unique("new")
        kept = small.request(kept_name)
        entry = small.entry(kept_name)
        intact = entry.read_bytes()
        filler = _fill(keystore)
        Keyring.join_session()
        with pytest.raises(TemporarilyUnavailableError):
            small.request(new_name)
        line = small.log.wait_for(new_name)
        assert line.startswith(ERR) and "ENOSPC" in line and "nothing was written" in line
        assert not small.entry(new_name).exists() and not _temps(small)
        assert entry.read_bytes() == intact
        Keyring.join_session()
        assert small.request(kept_name) == kept
        # EAGAIN is never cached: once there is room, the very next request creates the key.
        filler.unlink()
        assert len(small.request(new_name)) == 32
        assert small.entry(new_name).exists()


def _chmod(mode: int) -> Callable[[Path], None]:
    return lambda path: os.chmod(path, mode)


def _chown(uid: int) -> Callable[[Path], None]:
    return lambda path: os.chown(path, uid, -1)


def _symlink(path: Path) -> None:
    real = path.with_name(path.name + ".real")
    path.rename(real)
    path.symlink_to(real.name)


@pytest.mark.parametrize(
    ("where", "damage", "reason"),
    [
        ("root", _chmod(0o755), "unsafe"),
        ("root", _chown(1), "unsafe"),
        ("scope", _chmod(0o750), "unsafe"),
        ("scope", _symlink, "link"),
        ("name", _chmod(0o750), "unsafe"),
        ("name", _symlink, "link"),
        ("entry", _chmod(0o644), "unsafe"),
        ("entry", _chmod(0o640), "unsafe"),
        ("entry", _chown(1), "unsafe"),
        ("entry", _symlink, "link"),
    ],
)
def test_unsafe_keystore_is_refused(
    stored: StoredInstall, where: str, damage: Callable[[Path], None], reason: str
) -> None:
    name = unique("unsafe")
    key = stored.request(name)
    entry = stored.entry(name)
    places = {"root": stored.keystore, "scope": entry.parent.parent, "name": entry.parent}
    target = places.get(where, entry)
    st = target.stat()
    damage(target)
    stored.log.wait_for(name)  # the creation's line, out of the way
    try:
        Keyring.join_session()
        with pytest.raises(KeyRejectedError):
            stored.request(name)
        line = stored.log.wait_for(name)
        assert line.startswith(ERR) and reason in line
    finally:
        if target.is_symlink():
            real = target.with_name(target.name + ".real")
            target.unlink()
            real.rename(target)
        os.chown(target, st.st_uid, st.st_gid)
        os.chmod(target, st.st_mode & 0o7777)
    Keyring.join_session()
    assert stored.request(name) == key


def test_missing_keystore_is_refused_not_recreated(stored: StoredInstall) -> None:
    name = unique("nostore")
    away = stored.keystore.with_name("keystore.away")
    stored.keystore.rename(away)
    try:
        with pytest.raises(KeyRejectedError):
            stored.request(name)
        line = stored.log.wait_for(name)
        assert line.startswith(ERR) and "does not exist" in line
        assert not stored.keystore.exists()
    finally:
        away.rename(stored.keystore)
