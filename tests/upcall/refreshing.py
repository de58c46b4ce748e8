"""Running `kmskeys-resolver refresh` for a test install, and reading what it and the host cache
left behind: shared by the refresh-ahead tests and the refresh-ahead bench row."""

from __future__ import annotations

import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kmskeys.contract import HOSTCACHE_ENTRY_PREFIX
from tests.support.requester import as_user
from tests.upcall.harness import RESOLVER, Install, run_resolver

# What the refresher appends to the resolver's line for a key it renewed (resolver/refresh.py).
VIA = " via=refresh"
STARTUP = 60.0


@contextmanager
def refresher(install: Install, resolver: Path = RESOLVER) -> Iterator[subprocess.Popen[bytes]]:
    """`kmskeys-resolver refresh` (the loop) for `install` for the block; stopped after."""
    proc = subprocess.Popen(
        [str(resolver), "refresh", "--config", str(install.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Running once it says so: a machine under load may take seconds to start it, longer
        # than a short ttl, and a key answered before would expire unrenewed.
        _wait_for_line(install, " refresh=running ", proc)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _wait_for_line(install: Install, needle: str, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + STARTUP
    while time.monotonic() < end:
        found = next((line for line in list(install.log.lines) if needle in line), None)
        if found is not None:
            install.log.lines.remove(found)
            return
        assert proc.poll() is None, "kmskeys-resolver refresh exited"
        time.sleep(0.05)
    raise AssertionError(f"kmskeys-resolver refresh did not start within {STARTUP} s")


def refresh_once(install: Install) -> dict[int, str]:
    """`kmskeys-resolver refresh --once`: serial -> what happened to that key."""
    done = run_resolver("refresh", "--config", str(install.config), "--once")
    assert done.returncode == 0, done.stderr
    found = {}
    for line in done.stdout.splitlines():
        serial, _, rest = line.partition(" ")
        found[int(serial)] = rest.split(": ", 1)[1]
    return found


def recorded(install: Install, charged: int, serial: int, within: float = 10.0) -> list[int]:
    """records(), once `serial` is among them: the resolver remembers a key after it answered
    it (the handler before it exits, the resolver daemon when the gate reports), so a requester
    may wake before the record is written."""
    end = time.monotonic() + within
    while serial not in (found := records(install, charged)) and time.monotonic() < end:
        time.sleep(0.02)
    return found


def bucket_tokens(install: Install, uid: int) -> float | None:
    """The tokens left in `uid`'s KMS call bucket (resolver/limits.py), None if it has none."""
    path = Path(install.settings["state_dir"]) / f"bucket-{uid}"
    if not path.exists():
        return None
    tokens, _ = struct.unpack("=dd", path.read_bytes())
    return float(tokens)


def records(install: Install, charged: int) -> list[int]:
    """The serials refresh-ahead remembers for `charged` (resolver/keyrecords.py)."""
    folder = Path(install.settings["state_dir"]) / "refresh" / str(charged)
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
    )


def host_cache_entries(prefix: str) -> list[str]:
    """The host-cache entries of an install's prefix (in a root child: tests/upcall/
    test_hostcache.py says why)."""

    def look() -> list[str]:
        from kmskeys import keyutils
        from kmskeys.hostflush import host_cache_ring

        ring = host_cache_ring(create=False)
        if ring is None:
            return []
        found = []
        for serial in memoryview(keyutils.keyctl_read(ring)).cast("i").tolist():
            try:
                desc = keyutils.keyctl_describe_alloc(serial).split(b";", 4)[4].decode()
            except Exception:  # gone meanwhile
                continue
            if desc.startswith(f"{HOSTCACHE_ENTRY_PREFIX}{prefix}:"):
                found.append(desc)
        return sorted(found)

    result = as_user("root", look)
    assert isinstance(result, dict) and "ok" in result, result
    return list(result["ok"])


def purge_host_cache(prefix: str) -> None:
    """Invalidate the host-cache entries of an install's prefix (and nobody else's)."""

    def purge() -> int:
        from kmskeys import keyutils
        from kmskeys.hostflush import host_cache_ring

        ring = host_cache_ring(create=False)
        if ring is None:
            return 0
        count = 0
        for serial in memoryview(keyutils.keyctl_read(ring)).cast("i").tolist():
            try:
                desc = keyutils.keyctl_describe_alloc(serial).split(b";", 4)[4].decode()
                if desc.startswith(f"{HOSTCACHE_ENTRY_PREFIX}{prefix}:"):
                    keyutils.keyctl_invalidate(serial)
                    count += 1
            except Exception:  # gone meanwhile
                continue
        return count

    as_user("root", purge)
