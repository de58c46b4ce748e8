"""No packet of the suite reaches the instance-metadata addresses from the host's network.

Anything that touches IMDS (doctor's probes, `firewall status`) must run in a network namespace
the test creates. To catch what does not, the session moves itself into a cgroup (v2) of its
own, which every process it starts inherits, and puts one nftables table in the host's network
namespace: in the output hook, a packet from a socket of that cgroup to 169.254.169.254 or
fd00:ec2::254 is counted and refused (a TCP reset) or dropped. The kernel matches the socket's
cgroup, so other sessions sharing this machine are neither counted nor blocked, and packets of
processes in the tests' own network namespaces never meet this table. A test whose processes
sent any such packet fails (tests/conftest.py); tests/netns/test_imds_guard.py shows the guard
catching a real probe.

A canary rule (127.0.0.77, same match) lets a test prove the cgroup match works before it
probes IMDS on purpose. Processes the kernel starts (request-key, the resolver) are not in the
cgroup: their credentials come from the install's own file, never from IMDS.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from kmskeys.imds import IMDS_IPV4, IMDS_IPV6
from tests.support.names import unique

# nftables resolves a `socket cgroupv2` path below this directory (its SYSFS_CGROUPSV2_PATH).
NFT_CGROUP_BASE = Path("/sys/fs/cgroup")
CANARY = "127.0.0.77"
COUNTERS = ("imds4", "imds6", "canary")
CLONE_NEWNET = 0x40000000  # linux/sched.h


class GuardUnavailable(RuntimeError):
    """The guard cannot be set up here: the message says what is missing."""


def _cgroup2_mount() -> Path:
    """Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "cgroup2":
            return Path(left.split()[4])
    raise GuardUnavailable("a cgroup v2 (unified) hierarchy mounted below /sys/fs/cgroup")


def _own_cgroup() -> str:
    """This process's cgroup v2 path, e.g. `/` or `/system.slice/ci.service`."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise GuardUnavailable("this process in a cgroup v2 hierarchy (/proc/self/cgroup has no 0::)")


def _nft(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["nft", *args], input=stdin, capture_output=True, text=True, check=False, timeout=30
    )
    if done.returncode != 0:
        raise GuardUnavailable(f"nft {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


class HostImdsGuard:
    """Counts and drops this process tree's packets to IMDS on the host's network (root only)."""

    def __init__(self) -> None:
        self.name = unique("imds-guard")
        self.table = f"inet {self.name}"
        self.cgroup: Path | None = None
        self._home: Path | None = None  # the cgroup this process came from

    def install(self) -> HostImdsGuard:
        """Move this process into the guard's cgroup and add the table; GuardUnavailable if not."""
        if os.geteuid() != 0:
            raise GuardUnavailable("root")
        if shutil.which("nft") is None:
            raise GuardUnavailable("the 'nft' command (apt-get install nftables)")
        mount = _cgroup2_mount()
        try:
            relative = mount.relative_to(NFT_CGROUP_BASE)
        except ValueError:
            raise GuardUnavailable(
                f"cgroup v2 below {NFT_CGROUP_BASE} (it is at {mount})"
            ) from None
        home = mount / _own_cgroup().lstrip("/")
        cgroup = home / self.name
        try:
            cgroup.mkdir()
        except OSError as exc:
            raise GuardUnavailable(f"a writable cgroup v2 at {home} ({exc.strerror})") from None
        self.cgroup, self._home = cgroup, home
        try:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
            level = len(cgroup.relative_to(mount).parts)
            _nft("-f", "-", stdin=self._ruleset(str(relative / cgroup.relative_to(mount)), level))
        except OSError as exc:
            self.remove()
            raise GuardUnavailable(f"moving into {cgroup} ({exc.strerror})") from None
        except BaseException:
            self.remove()
            raise
        return self

    def _ruleset(self, path: str, level: int) -> str:
        ours = f'socket cgroupv2 level {level} "{path}"'
        # A TCP connect is answered with a reset at once (a dropped SYN would be retried until
        # the caller's timeout); anything else is dropped.
        rules = [
            f'{ours} {match} meta l4proto tcp counter name "{name}" reject with tcp reset\n'
            f'    {ours} {match} counter name "{name}" drop\n'
            for name, match in (
                ("imds4", f"ip daddr {IMDS_IPV4}"),
                ("imds6", f"ip6 daddr {IMDS_IPV6}"),
                ("canary", f"ip daddr {CANARY}"),
            )
        ]
        return (
            f"table {self.table} {{\n"
            + "".join(f"  counter {name} {{ }}\n" for name in COUNTERS)
            + "  chain output {\n"
            + "    type filter hook output priority raw; policy accept;\n"
            + "".join(f"    {rule}" for rule in rules)
            + "  }\n}\n"
        )

    def counts(self) -> dict[str, int]:
        """Packets counted so far, per counter (imds4, imds6, canary)."""
        found = json.loads(_nft("-j", "list", "table", *self.table.split()))
        return {
            item["counter"]["name"]: int(item["counter"]["packets"])
            for item in found["nftables"]
            if "counter" in item
        }

    def imds_packets(self) -> int:
        """Packets to either IMDS address so far."""
        counted = self.counts()
        return counted["imds4"] + counted["imds6"]

    def remove(self) -> None:
        """Delete the table, bring this process and any straggler home, remove the cgroup."""
        subprocess.run(
            ["nft", "delete", "table", *self.table.split()], capture_output=True, check=False
        )
        if self.cgroup is None or self._home is None:
            return
        procs = self._home / "cgroup.procs"
        with contextlib.suppress(OSError):  # then the rmdir below fails and the cgroup stays
            procs.write_text(str(os.getpid()))
        for _ in range(50):
            try:
                self.cgroup.rmdir()
                break
            except OSError:  # EBUSY: an exiting child, or one that outlived its test
                for pid in (self.cgroup / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):  # gone meanwhile
                        procs.write_text(pid)
                time.sleep(0.02)
        self.cgroup = None

    def header(self) -> str:
        """The pytest header line."""
        return (
            f"imds guard: this session's packets to {IMDS_IPV4} and {IMDS_IPV6} on the host's "
            f"network are counted and refused (nft table {self.table}, cgroup {self.cgroup})"
        )


def own_network() -> None:
    """Move this process (a forked child, one thread) to a new network namespace: loopback
    down, no route anywhere, so an IMDS probe fails at once and no packet is made. For a
    command, `unshare --net` does the same."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


__all__ = ["CANARY", "GuardUnavailable", "HostImdsGuard", "own_network"]
