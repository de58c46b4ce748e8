"""Finding a name's versions costs the same whatever else the keystore holds (issue 20.2).

The flat layout listed the whole scope directory on every `#latest` miss: 100,000 machine-scope
entries cost each miss of every uid about 360 ms. Now a name has a directory of its own, found
by one lookup. Measured here by the system calls of a machine-scope `#latest` miss, traced with
strace: with 100,000 other names beside it they are the very same calls as with none (a count,
never a time). And the flat layout of kmskeys 0.1 still serves: moved a name at a time on first
use, or all at once by `stored migrate`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from resolver.backend import Context, Request
from resolver.config import parse
from resolver.gateway import UNMETERED
from resolver.keystore import Entry, EntryId, Keystore
from resolver.keystore_migrate import migrate_all
from resolver.stored import StoredBackend
from tests.support.names import unique

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("as_root")]

OTHERS = 100_000
LINKS_PER_FILE = 50_000
BEGIN, END = "/kmst-lookup-begin", "/kmst-lookup-end"
# Memory management varies with the allocator's mood, not with the keystore.
_MEMORY = {"mmap", "munmap", "brk", "mprotect", "madvise", "mremap"}

_MISS = f"""
import os, sys, time
from resolver.backend import Context, Request
from resolver.config import parse
from resolver.gateway import UNMETERED
from resolver.stored import StoredBackend
keystore, name = sys.argv[1], sys.argv[2]
config = parse({{"keystore_dir": keystore, "stored": {{"kmst-*": {{"scope": "machine"}}}}}})
def miss():
    request = Request("stored", name, 0, 0, "root", b"32", "#machine#latest")
    return StoredBackend(config).resolve(request, Context(time.monotonic() + 5, UNMETERED))
miss()  # imports and caches out of the way
os.access({BEGIN!r}, os.F_OK)
answer = miss().payload
os.access({END!r}, os.F_OK)
assert answer == b"1", answer
"""


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "tier 'unit' (keystore) cannot run here; missing: root (the keystore is root's)"
        )


def _keystore(tmp_path: Path) -> Path:
    root = tmp_path / unique("ks")
    root.mkdir(mode=0o700)
    return root


def _entry(eid: EntryId) -> Entry:
    return Entry(eid, 1_700_000_000, 32, "none", bytes(range(32)))


def _syscalls(keystore: Path, name: str) -> Counter[str]:
    """The system calls of one machine-scope `#latest` miss of `name`, by name."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("tier 'unit' cannot run here; missing: the 'strace' command (apt strace)")
    trace = keystore.parent / f"{keystore.name}.trace"
    checkout = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [strace, "-qq", "-o", str(trace), sys.executable, "-c", _MISS, str(keystore), name],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": checkout},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = trace.read_text().splitlines()
    trace.unlink()
    start = next(i for i, line in enumerate(lines) if BEGIN in line)
    end = next(i for i, line in enumerate(lines) if END in line)
    calls = Counter(re.match(r"\w+", line).group(0) for line in lines[start + 1 : end])  # type: ignore[union-attr]
    return Counter({call: n for call, n in calls.items() if call not in _MEMORY})


def test_a_machine_latest_miss_costs_the_same_beside_100000_other_names(tmp_path: Path) -> None:
    name = unique("lookup")
    alone, crowded = _keystore(tmp_path), _keystore(tmp_path)
    for root in (alone, crowded):
        Keystore(root).create(_entry(EntryId("machine", None, name, 1)))
    # 100,000 other names, each a directory with one entry (hard links of one file: the miss
    # never reads another name's entry, so what they hold does not matter).
    machine = crowded / "machine"
    for index in range(OTHERS):
        if index % LINKS_PER_FILE == 0:  # ext4 allows 65,000 links to a file
            template = crowded / f"template-{index}"
            template.write_bytes(_entry(EntryId("machine", None, "x", 1)).encode())
            os.chmod(template, 0o600)
        other = machine / f"kmst-other-{index:06d}"
        other.mkdir(mode=0o700)
        os.link(template, other / "1")
    assert len(os.listdir(machine)) == OTHERS + 1
    few, many = _syscalls(alone, name), _syscalls(crowded, name)
    assert few == many, (few, many)
    assert few["getdents64"] <= 4, few  # the name's own directory, read once
    assert sum(few.values()) < 80, few


def _flat(root: Path, eid: EntryId, key: bytes) -> Path:
    """An entry written where kmskeys 0.1 put it (`SCOPE/NAME#VERSION`)."""
    where = root.joinpath(*eid.directory())
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    for directory in (root / "user", where):
        if directory.exists():
            os.chmod(directory, 0o700)
    path = where / eid.flat_name()
    path.write_bytes(Entry(eid, 1_700_000_000, len(key), "none", key).encode())
    os.chmod(path, 0o600)
    return path


def _resolve(root: Path, request: Request) -> bytes:
    config = parse(
        {"keystore_dir": str(root), "stored": {"kmst-*-machine-*": {"scope": "machine"}}}
    )
    return StoredBackend(config).resolve(request, Context(10**9, UNMETERED)).payload


def test_the_flat_layout_moves_a_name_on_first_use_and_keeps_its_keys(tmp_path: Path) -> None:
    root = _keystore(tmp_path)
    name, machine_name = unique("old"), unique("machine")
    v1, v2, shared = os.urandom(32), os.urandom(32), os.urandom(32)
    flats = [
        _flat(root, EntryId("user", 0, name, 1), v1),
        _flat(root, EntryId("user", 0, name, 2), v2),
        _flat(root, EntryId("machine", None, machine_name, 1), shared),
    ]
    ask = Request("stored", name, 0, 0, "root", b"32", "#user#latest")
    assert _resolve(root, ask) == b"2"  # both versions moved, not a new version 1
    assert _resolve(root, Request("stored", name, 0, 0, "root", b"32")) == v1
    assert _resolve(root, Request("stored", name, 0, 0, "root", b"32", "#user#v2")) == v2
    assert not flats[0].exists() and not flats[1].exists()
    assert (root / "user/0" / name / "2").read_bytes() == Entry(
        EntryId("user", 0, name, 2), 1_700_000_000, 32, "none", v2
    ).encode()
    # The machine-scope name is still flat until asked for, or until `stored migrate`.
    assert flats[2].exists()
    assert migrate_all(Keystore(root)) == (1, 1)
    assert not flats[2].exists()
    machine = Request("stored", machine_name, 5, 5, None, b"32", "#machine")
    assert _resolve(root, machine) == shared
    assert migrate_all(Keystore(root)) == (0, 0)  # nothing left: a second run is a no-op


def test_a_flat_entry_and_a_different_moved_one_are_both_kept(tmp_path: Path) -> None:
    root = _keystore(tmp_path)
    name = unique("clash")
    eid = EntryId("user", 0, name, 1)
    Keystore(root).create(_entry(eid))
    flat = _flat(root, eid, os.urandom(32))
    (root / "user/0" / name).rename(root / "user/0" / f"{name}.aside")
    os.mkdir(root / "user/0" / name, 0o700)
    os.link(root / "user/0" / f"{name}.aside" / "1", root / "user/0" / name / "1")
    with pytest.raises(Exception, match="both exist and differ"):
        migrate_all(Keystore(root))
    assert flat.exists()  # neither is touched
