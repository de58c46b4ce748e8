"""What a host needs for program-bound names (allow_units, allow_cgroups, allow_exe):
cgroup v2 to read a requester's unit, Yama to keep other programs of the uid from tracing the
allowed one, and a key count for one copy of each name per service keyring (docs/security.md,
section 12)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from kmskeys.checkreport import ConfigLoaded
from kmskeys.doctor.finding import FAIL, INFO, OK, WARN, Finding

MOUNTINFO = Path("/proc/self/mountinfo")
PTRACE_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
MAXKEYS = Path("/proc/sys/kernel/keys/maxkeys")
MAXBYTES = Path("/proc/sys/kernel/keys/maxbytes")
# Each service keyring holds its own copy of a program-bound name (possessor bits only): a uid
# running a few services with a few such names each passes the kernel's default of 200 keys.
MIN_MAXKEYS = 1000
MIN_MAXBYTES = 100_000
_SYSCTL_D = "/etc/sysctl.d/60-kmskeys.conf"


def check_program_host(
    config: ConfigLoaded,
    *,
    mountinfo: Path = MOUNTINFO,
    ptrace_scope: Path = PTRACE_SCOPE,
    maxkeys: Path = MAXKEYS,
    maxbytes: Path = MAXBYTES,
) -> Iterator[Finding]:
    """cgroup v2, Yama and the key count, when the config binds names to programs."""
    policies = config["program_policies"]
    if not policies:
        return
    named = ", ".join(f'[{p["table"]}."{p["glob"]}"]' for p in policies[:3])
    by_unit = [p for p in policies if p.get("allow_units") or p.get("allow_cgroups")]
    if by_unit and not _cgroup2(mountinfo):
        yield Finding(
            FAIL,
            "programs",
            f"{named} bind names to units or cgroups, but no cgroup v2 hierarchy is mounted: "
            "the requester's unit cannot be read and every such request is refused",
            "mount -t cgroup2 none /sys/fs/cgroup  # or boot with "
            "systemd.unified_cgroup_hierarchy=1",
        )
    yield from _yama(named, ptrace_scope)
    yield from _key_count(maxkeys, maxbytes)


def _cgroup2(mountinfo: Path) -> bool:
    try:
        text = mountinfo.read_bytes()
    except OSError:
        return os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    # ID PARENT DEV ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
    return any(line.partition(b" - ")[2].startswith(b"cgroup2 ") for line in text.splitlines())


def _yama(named: str, path: Path) -> Iterator[Finding]:
    try:
        scope = int(path.read_text().strip())
    except FileNotFoundError:
        yield Finding(
            INFO,
            "programs",
            f"{named} bind names to programs and this kernel has no Yama: another program of "
            "the same uid can trace the allowed one and read the secret it holds; give it a "
            "uid of its own, or make it non-dumpable (docs/security.md, section 12)",
        )
        return
    except (OSError, ValueError):
        return
    if scope == 0:
        yield Finding(
            WARN,
            "programs",
            f"{named} bind names to programs, but kernel.yama.ptrace_scope is 0: any program "
            "of the same uid can trace the allowed one and read the secret it holds",
            f"sysctl -w kernel.yama.ptrace_scope=1 && echo kernel.yama.ptrace_scope=1 >> "
            f"{_SYSCTL_D}",
        )
    else:
        yield Finding(
            OK, "programs", f"kernel.yama.ptrace_scope is {scope}: only ancestors may trace"
        )


def _key_count(maxkeys: Path, maxbytes: Path) -> Iterator[Finding]:
    try:
        keys, size = int(maxkeys.read_text()), int(maxbytes.read_text())
    except (OSError, ValueError):
        return
    if keys >= MIN_MAXKEYS and size >= MIN_MAXBYTES:
        yield Finding(OK, "programs", f"kernel.keys.maxkeys {keys}, maxbytes {size} per uid")
        return
    want_keys, want_bytes = max(keys, MIN_MAXKEYS), max(size, MIN_MAXBYTES)
    yield Finding(
        WARN,
        "programs",
        f"kernel.keys.maxkeys is {keys} and maxbytes {size} per uid: each service keyring "
        "holds its own copy of a program-bound name, and a full quota refuses new ones "
        "(EDQUOT)",
        f"sysctl -w kernel.keys.maxkeys={want_keys} kernel.keys.maxbytes={want_bytes} && "
        f"printf 'kernel.keys.maxkeys={want_keys}\\nkernel.keys.maxbytes={want_bytes}\\n' >> "
        f"{_SYSCTL_D}",
    )
