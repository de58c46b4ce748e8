"""Which programs of a uid may have a name: `allow_units`, `allow_cgroups` and `allow_exe`.

The rest is comments: a bound miss loads this module, and comments cost it nothing."""

# Pure functions over resolver.task.Requester. The three keys are valid in any backend's
# per-name policy section (`[names."GLOB"]`, `[stored."GLOB"]`, ...: the settings tables add them
# to every policy table, resolver/settings.py), and their grammar is checked with the config's
# (resolver/validators.py, so that a miss for a name without them never loads this module);
# `refusal` answers whether a requester passes. Each key is optional; a requester must pass every
# key the section sets (one entry of each list suffices). Each failing check has its own reason.
#
# - `allow_units`: systemd unit names or globs (`nginx.service`, `app-*.scope`), matched against
#   the unit read from the root-controlled part of the requester's cgroup path. A pattern ends in
#   a literal unit suffix, so `nginx*` cannot match `nginx-evil.scope` by accident.
# - `allow_cgroups`: cgroup v2 path globs (`/system.slice/app.service`,
#   `/user.slice/*/session-*.scope`), matched against the same root-controlled part; `*` and `?`
#   stay within one path component and a `**` component spans any number of them. For hosts
#   without systemd, or a desktop session.
# - `allow_exe`: absolute paths, exact. The running executable must be that file, and only root
#   may be able to change what the path names. An interpreter's path (python3, bash, node) admits
#   every script of the uid that interpreter runs: name a compiled program, or use a unit.

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from resolver.log import field
from resolver.task import Record
from resolver.validators import PROGRAM_KEYS, PROGRAM_RULE_CHECKS

if TYPE_CHECKING:
    from resolver.task import Requester

KEYS = PROGRAM_KEYS


class ProgramPolicy(Record):
    """The program checks of one names rule; None: that key is not set."""

    __slots__ = ("cgroups", "exes", "units")

    def __init__(
        self,
        units: tuple[str, ...] | None = None,
        cgroups: tuple[str, ...] | None = None,
        exes: tuple[str, ...] | None = None,
    ) -> None:
        self.units, self.cgroups, self.exes = units, cgroups, exes

    @property
    def binds(self) -> bool:
        """True if any key is set: the name answers only to the programs it lists."""
        return self.units is not None or self.cgroups is not None or self.exes is not None


class Refusal(Record):
    """Why a requester fails a policy: `check` is unit, cgroup or exe; `reason` is log-safe."""

    __slots__ = ("check", "reason")

    def __init__(self, check: str, reason: str) -> None:
        self.check, self.reason = check, reason


def parse_program_policy(section: Mapping[str, object], where: str) -> ProgramPolicy:
    """The program keys of one config section, validated (other keys are the caller's)."""
    found = {
        key: PROGRAM_RULE_CHECKS[key](section[key], f"{where}.{key}")
        for key in KEYS
        if section.get(key) is not None
    }
    return program_policy(**found)


def program_policy(
    allow_units: tuple[str, ...] | None = None,
    allow_cgroups: tuple[str, ...] | None = None,
    allow_exe: tuple[str, ...] | None = None,
) -> ProgramPolicy:
    """The ProgramPolicy of validated keys (a names rule's, resolver/validators.NameRule)."""
    return ProgramPolicy(units=allow_units, cgroups=allow_cgroups, exes=allow_exe)


def refusal(policy: ProgramPolicy, who: Requester) -> Refusal | None:
    """None if `who` passes every check `policy` sets, else the first check it fails."""
    from fnmatch import fnmatchcase

    if policy.units is not None:
        if who.unit is None:
            return Refusal("unit", f"no systemd unit in cgroup {_shown_cgroup(who)}")
        if not any(fnmatchcase(who.unit, pattern) for pattern in policy.units):
            return Refusal("unit", f"unit {field(who.unit)} is not in allow_units")
    if policy.cgroups is not None and not any(
        cgroup_matches(pattern, who.trusted) for pattern in policy.cgroups
    ):
        return Refusal("cgroup", f"cgroup {_shown_cgroup(who)} is not in allow_cgroups")
    if policy.exes is not None:
        if who.exe is None or who.exe_problem is not None:
            return Refusal("exe", f"exe {field(who.exe or '?')}: {who.exe_problem}")
        if who.exe not in policy.exes:
            return Refusal("exe", f"exe {field(who.exe)} is not in allow_exe")
    return None


def cgroup_matches(pattern: str, path: str) -> bool:
    """True if cgroup `path` matches glob `pattern` component by component (`**`: any depth)."""
    return _match(_parts(pattern), _parts(path))


def _parts(path: str) -> list[str]:
    return [] if path == "/" else path.split("/")[1:]


def _match(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    from fnmatch import fnmatchcase

    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _match(pattern[1:], parts[1:])


def _shown_cgroup(who: Requester) -> str:
    if who.trusted == who.cgroup:
        return field(who.cgroup)
    # Below a delegated cgroup its owner names the groups: only the delegated one counts.
    return f"{field(who.trusted)} (delegated; the requester is in {field(who.cgroup)})"
