"""500 hostile requests through the real upcall: each ends in a defined errno, nothing escapes.

Random callouts (bytes, base64, valid blobs with one bit flipped, 4095-byte callouts, NULs,
newlines, shell metacharacters, `%` sequences) and random names (very long, `..`, `//`, leading
`/`, unicode) go to a resolver whose blob_dir sits in a directory watched with inotify: the
resolver must never open anything next to blob_dir, must never run anything, must log a defined
reason for each refusal, and must leave no process behind.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kmskeys import (
    InvalidArgumentError,
    Key,
    KeyNotFoundError,
    KeyRejectedError,
)
from tests.fuzz.inotify import OpenWatch
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.names import unique
from tests.upcall.harness import Install, handler_pids, installed, kms_stack

pytestmark = [pytest.mark.fuzz, pytest.mark.upcall]

REQUESTS = 500
WORKERS = 4
SEED = int.from_bytes(os.urandom(4), "big")
# Outcomes a hostile request may have: unknown, refused, or the kernel's own EINVAL.
DEFINED = (KeyNotFoundError, KeyRejectedError, InvalidArgumentError)
SHELL = ["$(touch {canary})", "`touch {canary}`", "; touch {canary}", "| touch {canary}", "&&", ">"]
PERCENT = ["%k", "%d", "%c", "%u", "%s", "%n", "%%", "%x%x%x", "%S %P %T"]
NAMEBITS = ["..", "/", "//", ".", "a", "Z", "0", "-", "@", "+", "_", "é", "日本", "\n", " ", "\t"]


@pytest.fixture(scope="module")
def jail() -> Iterator[Path]:
    """A directory holding only blob_dir and canaries: nothing in it may ever be opened."""
    root = Path(tempfile.mkdtemp(prefix=unique("jail") + "-"))
    os.chmod(root, 0o755)
    (root / "blobs").mkdir(mode=0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def hostile(jail: Path) -> Iterator[Install]:
    """A resolver whose blob_dir is jail/blobs, with the canaries next to it."""
    stack: tuple[KmsEmulator, KmsProxy, str]
    with (
        kms_stack() as stack,
        installed(
            # Not the per-uid limit under test here: WORKERS requests at once must all be handled.
            # The production deadline, not the tiers' short one: on a loaded 2-core machine a
            # flipped blob's KMS round trip took over 4 s, an EAGAIN this test cannot tell from
            # a wrong answer.
            *stack,
            blob_dir=jail / "blobs",
            max_concurrent_per_uid=2 * WORKERS,
            deadline=8,
        ) as install,
    ):
        # Valid blobs just outside blob_dir: a traversal that reached one would decrypt it.
        for name in ("outside", "x", "passwd", "blobs"):
            (jail / f"{name}.kms").write_text(install.blob(b"kmst-escaped", name))
        os.mkfifo(jail / "fifo.kms", 0o644)
        yield install


def _random_name(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return "".join(rng.choice(NAMEBITS) for _ in range(rng.randrange(1, 30)))
    if kind == 1:
        return rng.choice(["../", "/", "a//", "./", "a/../../", "blobs/../"]) + rng.choice(
            ["outside", "x", "passwd", "fifo", "etc/passwd"]
        )
    if kind == 2:
        return "n" * rng.choice([199, 200, 201, 1000, 3900])
    if kind == 3:
        return rng.choice(PERCENT) + rng.choice(SHELL) + "x"
    if kind == 4:
        return bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 40))).decode("latin-1")
    return f"ok-{rng.randrange(10**6)}"


def _random_callout(rng: random.Random, canary: Path) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        return os.urandom(rng.randrange(0, 300))
    if kind == 1:
        return base64.b64encode(os.urandom(rng.randrange(1, 600)))
    if kind == 2:
        return b"kmsk1:" + base64.urlsafe_b64encode(os.urandom(rng.randrange(1, 600))).rstrip(b"=")
    if kind == 3:
        filler = rng.choice([b"A", b"kmsk1:", b"\n", b"%c", b"\0"])
        return (filler * 4095)[:4095]
    if kind == 4:
        return rng.choice(SHELL).format(canary=canary).encode() + b"\n--config=/etc/passwd"
    if kind == 5:
        return " ".join(rng.choice(PERCENT) for _ in range(10)).encode()
    return b""  # blob_dir lookup of a hostile name


def _flip(text: str, rng: random.Random) -> bytes:
    raw = bytearray(text.encode())
    bit = rng.randrange(len(raw) * 8)
    raw[bit // 8] ^= 1 << (bit % 8)
    return bytes(raw)


def test_hostile_requests_end_in_defined_errnos_and_stay_in_blob_dir(
    hostile: Install, jail: Path, session_keyring: object
) -> None:
    rng = random.Random(SEED)
    canary = jail / "pwned"
    requests: list[tuple[bytes, bytes, bytes | None]] = []  # description, callout, expected
    for index in range(REQUESTS):
        if index % 5 == 0:
            # A valid blob with one bit flipped, under its own name: refused unless the flip
            # left the blob intact, in which case the payload must be exact.
            name = unique("flip")
            payload = b"kmst-flip-" + os.urandom(6).hex().encode()
            text = hostile.blob(payload, name, envelope=rng.random() < 0.3)
            requests.append((f"{hostile.prefix}:{name}".encode(), _flip(text, rng), payload))
        else:
            name = _random_name(rng)
            desc = f"{hostile.prefix}:{name}".encode("utf-8", "surrogateescape")
            requests.append((desc, _random_callout(rng, canary), None))

    def run(request: tuple[bytes, bytes, bytes | None]) -> tuple[str, float]:
        desc, callout, expected = request
        start = time.monotonic()
        try:
            value = Key.request(desc, callout).read()
        except DEFINED as exc:
            return type(exc).__name__, time.monotonic() - start
        except Exception as exc:
            return f"undefined {type(exc).__name__}: {exc}", time.monotonic() - start
        ok = expected is not None and value == expected
        return ("ok" if ok else "wrong payload"), time.monotonic() - start

    deadline = hostile.settings["deadline"]
    with OpenWatch(jail) as watch, ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(run, requests))
        time.sleep(0.2)  # let inotify deliver the last events
        escapes = watch.opened(ignore=("blobs",))
        # The watch does see opens: a root process reading a canary is reported.
        subprocess.run(["cat", str(jail / "x.kms")], check=True, capture_output=True)
        time.sleep(0.2)
        assert ("x.kms", False) in watch.opened(), "the inotify watch is blind"
    summary = {outcome for outcome, _ in results}
    assert summary <= {"ok", *(cls.__name__ for cls in DEFINED)}, (SEED, summary)
    slowest = max(seconds for _, seconds in results)
    assert slowest < deadline + 1, (SEED, slowest)
    # blob_dir itself is opened (as a directory) on every lookup; nothing else next to it.
    assert escapes == [], SEED
    assert not canary.exists()
    assert handler_pids(hostile.config) == []
    lines = hostile.log.drain()
    assert lines, "the resolver logged nothing"
    internal = [line for line in lines if "internal error" in line or "outcome=error" in line]
    assert internal == [], (SEED, internal[:3])
    assert threading.active_count() < 20
