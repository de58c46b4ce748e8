"""Code the suite runs as another uid reaches the checkout and its venv, wherever they lie.

A clone below a directory other users cannot enter (a `mktemp -d` folder and /root are 0700)
leaves a process that became another user (a setuid child, an fsuid child: the kernel checks
paths by the fsuid) unable to import anything it had not imported yet, or to execute the venv's
programs. So every child that changes its ids calls `reach_checkout()` first, while still root:
where such a directory lies above the checkout, the child moves to a private mount namespace in
which a small tmpfs (mode 0711, holding only the path down) covers the topmost such directory
and the checkout and the venv are bind-mounted back at their own paths. Paths stay the same for
the child and every program it runs; nothing changes outside it, and the namespace goes with the
last process in it. The other entries of a covered directory are hidden from the child only.

`unreachable()` is the suite's check at the start: the one line it returns, if any, names the
directory another uid still cannot read (the checkout itself private, say) and the fix.
"""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from kmskeys.upcall_probe import become_user, nobody

ROOT = Path(__file__).resolve().parents[2]
BENCH_PYTHON_ENV = "KMSKEYS_BENCH_PYTHON"

# linux/sched.h, linux/mount.h
CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
# Enough to walk through, not to list: the covering tmpfs reveals nothing but the path down.
WALK_MODE = 0o711
# What a process of another uid imports first: the packages, their C parts, their lazy imports.
PROBE_IMPORTS = "kmskeys, kmskeys._hitpath, encryptor, resolver, cryptography.hazmat.primitives.kdf"


def needed() -> list[Path]:
    """The directories a process of another uid reads: the checkout, the venvs, the
    interpreter (pyenv's lives under /root, say) and sys.path."""
    found = {ROOT, Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent}
    found.update(Path(entry) for entry in sys.path if entry and Path(entry).is_dir())
    bench = os.environ.get(BENCH_PYTHON_ENV)
    if bench:
        found.add(Path(bench).absolute().parent.parent)
    resolved = sorted({path.resolve() for path in found})
    # A path below another one comes along with it.
    return [p for p in resolved if not any(o != p and o in p.parents for o in resolved)]


def _walkable(path: Path) -> bool:
    # Other uids enter a directory through its "other" x bit (the suite's users share no group).
    return bool(path.stat().st_mode & stat.S_IXOTH)


def blocking(path: Path) -> Path | None:
    """The topmost directory above `path` that other uids cannot walk through, if any."""
    for ancestor in reversed(path.parents):
        if not _walkable(ancestor):
            return ancestor
    return None


@cache
def covers() -> dict[Path, tuple[Path, ...]]:
    """Each directory the child's view covers -> the paths below it bound back (once per run)."""
    plan: dict[Path, list[Path]] = {}
    for path in needed():
        top = blocking(path)
        if top is not None:
            plan.setdefault(top, []).append(path)
    return {top: tuple(paths) for top, paths in plan.items()}


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    char = ctypes.c_char_p
    libc.mount.argtypes = [char, char, char, ctypes.c_ulong, char]
    return libc


def _mount(
    libc: ctypes.CDLL, source: str, target: Path, flags: int, *, tmpfs_options: str | None = None
) -> None:
    """mount(2): a tmpfs with `tmpfs_options`, else a bind or propagation change."""
    fstype = "tmpfs" if tmpfs_options is not None else None
    args = [None if s is None else os.fsencode(s) for s in (source, str(target), fstype)]
    data = None if tmpfs_options is None else tmpfs_options.encode()
    if libc.mount(*args, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _skeleton(top: Path, path: Path) -> None:
    """The directories from `top` (a fresh tmpfs) down to `path`, each only walkable."""
    current = top
    for part in path.relative_to(top).parts:
        current = current / part
        current.mkdir(mode=WALK_MODE, exist_ok=True)
        current.chmod(WALK_MODE)


def cover(top: Path, paths: Iterable[Path], *, mode: int = WALK_MODE) -> None:
    """In a private mount namespace: a tmpfs of `mode` over `top`, `paths` (below it) bound back
    at their own paths, the directories between only walkable."""
    libc = _libc()
    # Opened in this namespace, before the tmpfs hides them: a bind's source must be a mount of
    # the caller's own namespace.
    fds = {path: os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for path in paths}
    try:
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        _mount(libc, "kmskeys-test-view", top, flags, tmpfs_options=f"mode={mode:o},size=1m")
        for path, fd in fds.items():
            _skeleton(top, path)
            _mount(libc, f"/proc/self/fd/{fd}", path, MS_BIND | MS_REC)
    finally:
        for fd in fds.values():
            os.close(fd)


def private_mounts() -> None:
    """Move this process (one thread: a forked child) to a private copy of the mount table."""
    libc = _libc()
    # unshare(CLONE_NEWNS) needs an unshared fs_struct: a forked child has one thread.
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    _mount(libc, "none", Path("/"), MS_REC | MS_PRIVATE)  # nothing leaks back to the host


def reach_checkout() -> None:
    """In a child about to change its ids (or a subprocess's preexec_fn), as root: give it a
    view in which every uid reaches the checkout and the venvs. Does nothing where they already
    can, so it costs nothing on most machines."""
    plan = covers()
    if not plan:
        return
    private_mounts()
    cwd = os.getcwd()
    for top, paths in plan.items():
        cover(top, paths)
    os.chdir(cwd)  # the same path, now through the view


def header() -> list[str]:
    """A pytest header line when the view is in use, naming what it covers."""
    return [
        f"other uids: {top} (mode {top.stat().st_mode & 0o777:o}) is closed to them; their "
        f"processes reach {', '.join(map(str, paths))} through a private view (support/reach.py)"
        for top, paths in covers().items()
    ]


def _as_nobody() -> None:
    reach_checkout()
    become_user(*nobody())


def unreachable() -> str | None:
    """None if a process of uid nobody, given the view, imports what the suite's children use
    and runs the venv's interpreter; else one line naming the directory and the fix."""
    if os.geteuid() != 0:
        return None  # no test can become another uid: the tiers' prerequisites say so
    script = (
        "import os, sys\n"
        "for p in sys.argv[1:]:\n"
        "    if not os.access(p, os.R_OK | os.X_OK): sys.exit('unreadable ' + p)\n"
        f"import {PROBE_IMPORTS}\n"
    )
    paths = [str(path) for path in needed()]
    proc = subprocess.run(
        [sys.executable, "-c", script, *paths],
        preexec_fn=_as_nobody,
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        check=False,
    )
    if proc.returncode == 0:
        return None
    lines = (proc.stderr.strip() or f"exit status {proc.returncode}").splitlines()
    last = lines[-1]
    where = last.removeprefix("unreadable ") if last.startswith("unreadable ") else str(ROOT)
    return (
        f"uid nobody cannot use {where} ({last}): the suite runs code as other uids from it; "
        f"make it readable by every user (chmod -R o+rX {where}), or clone it with umask 022"
    )


__all__ = ["cover", "covers", "header", "needed", "private_mounts", "reach_checkout", "unreachable"]
