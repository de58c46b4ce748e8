"""Real cgroup v2 groups for a test: a unique slice with units in it, processes moved in and out.

No systemd is needed: a test makes `kmstest-<unique>.slice/app.service` (and others) in the
kernel's cgroup2 hierarchy, wherever it is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
a hybrid host), moves real processes in, and on leaving moves every process left inside back to
where the test process itself is and removes the groups, deepest first, also on failure.
`missing()` says what keeps this machine from doing so (a test fails with it, never skips).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path

from tests.support.names import unique

MOUNTINFO = Path("/proc/self/mountinfo")
# An exiting process leaves its cgroup a moment after its parent reaps it.
RMDIR_PATIENCE = 5.0


def mount_point() -> Path | None:
    """Where the cgroup2 hierarchy is mounted (its root, not a bind of a subtree), if anywhere."""
    for line in MOUNTINFO.read_text().splitlines():
        head, _, tail = line.partition(" - ")
        fields = head.split()
        if tail.startswith("cgroup2 ") and fields[3] == "/":
            # mountinfo escapes space, tab, newline and backslash as \ooo.
            return Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return None


def own_cgroup(pid: int | str = "self") -> str:
    """The cgroup v2 path of a process (`0::` line of /proc/PID/cgroup)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise RuntimeError(f"process {pid} has no cgroup2 line in /proc/{pid}/cgroup")


@cache
def missing() -> list[str]:
    """What this machine lacks to run the cgroup tests (empty when they can run)."""
    if os.geteuid() != 0:
        return ["root, to create cgroups (run the suite as root, as CI does)"]
    mount = mount_point()
    if mount is None:
        return ["a mounted cgroup2 hierarchy (mount -t cgroup2 none /sys/fs/cgroup)"]
    try:
        with Slice(units=("probe.service",)) as probe:
            probe.check_moves()
    except OSError as exc:
        return [f"creating a cgroup under {mount} and moving a process into it ({exc})"]
    return []


class Slice:
    """`kmstest-<unique>.slice` with the given units, created on entry, removed on exit."""

    def __init__(self, units: tuple[str, ...] = ("app.service", "other.service")) -> None:
        mount = mount_point()
        if mount is None:
            raise RuntimeError("no cgroup2 hierarchy is mounted")
        self.mount = mount
        self.name = f"kmstest-{unique('cg')}.slice"
        self.units = units
        self.home = own_cgroup()
        self._made: list[Path] = []

    def __enter__(self) -> Slice:
        try:
            self._mkdir(self.mount / self.name)
            for unit in self.units:
                self._mkdir(self.mount / self.name / unit)
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _mkdir(self, path: Path) -> None:
        path.mkdir()
        self._made.append(path)

    def path(self, unit: str) -> str:
        """The cgroup path of `unit` as /proc/PID/cgroup shows it (`/kmstest-….slice/unit`)."""
        return f"/{self.name}/{unit}"

    def directory(self, cgroup: str) -> Path:
        """The directory of a cgroup path under the mount."""
        return self.mount / cgroup.lstrip("/")

    def sub(self, parent: str, name: str, owner: int | None = None) -> str:
        """Make cgroup `parent/name`; with `owner`, delegate it (directory, cgroup.procs and
        cgroup.threads chowned to that uid, as systemd's Delegate= does). Its path."""
        path = self.directory(parent) / name
        self._mkdir(path)
        if owner is not None:
            for item in (path, path / "cgroup.procs", path / "cgroup.threads"):
                os.chown(item, owner, -1)
        return f"{parent}/{name}"

    def move(self, pid: int, cgroup: str) -> None:
        """Move process `pid` (all its threads) into cgroup path `cgroup`."""
        (self.directory(cgroup) / "cgroup.procs").write_text(f"{pid}\n")

    def check_moves(self) -> None:
        """Move a short-lived child in and out of the first unit (raises OSError if it fails)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
        os.close(read_end)
        try:
            self.move(pid, self.path(self.units[0]))
            if own_cgroup(pid) != self.path(self.units[0]):
                raise OSError(f"process {pid} is in {own_cgroup(pid)} after the move")
        finally:
            os.close(write_end)
            os.waitpid(pid, 0)

    def cleanup(self) -> None:
        """Move every process left inside back home, then remove the groups, deepest first."""
        home = self.directory(self.home) / "cgroup.procs"
        for path in reversed(self._made):
            with suppress(OSError):
                for pid in (path / "cgroup.procs").read_text().split():
                    with suppress(OSError):  # it exited meanwhile
                        home.write_text(f"{pid}\n")
        for path in reversed(self._made):
            deadline = time.monotonic() + RMDIR_PATIENCE
            while path.exists():
                try:
                    path.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        self._made.clear()


@contextmanager
def slice_with(*units: str) -> Iterator[Slice]:
    """A Slice with `units` (default app.service and other.service)."""
    with Slice(units or ("app.service", "other.service")) as made:
        yield made
