"""Which programs of a uid may have a name: `allow_units`, `allow_cgroups` and `allow_exe`.

Pure functions over resolver.requester.Requester. `parse_program_policy` validates the three
keys of one `[names."GLOB"]` (or `[stored."GLOB"]`) section for the config table; `refusal`
answers whether a requester passes. Each key is optional; a requester must pass every key the
section sets (one entry of each list suffices). Each failing check has its own reason.

- `allow_units`: systemd unit names or globs (`nginx.service`, `app-*.scope`), matched against
  the unit read from the root-controlled part of the requester's cgroup path. A pattern ends in
  a literal unit suffix, so `nginx*` cannot match `nginx-evil.scope` by accident.
- `allow_cgroups`: cgroup v2 path globs (`/system.slice/app.service`,
  `/user.slice/*/session-*.scope`), matched against the same root-controlled part; `*` and `?`
  stay within one path component and a `**` component spans any number of them. For hosts
  without systemd, or a desktop session.
- `allow_exe`: absolute paths, exact. The running executable must be that file, and only root
  may be able to change what the path names. An interpreter's path (python3, bash, node) admits
  every script of the uid that interpreter runs: name a compiled program, or use a unit.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase

from resolver.errors import ConfigError
from resolver.log import field
from resolver.requester import UNIT_SUFFIXES, Record, Requester

KEYS = ("allow_units", "allow_cgroups", "allow_exe")
# systemd's unit name alphabet (unit-name.c: letters, digits, ":-_.\@"), plus glob characters.
_UNIT_CHARS = frozenset(string.ascii_letters + string.digits + ":_.\\@" + "*?[]!-")
_UNIT_MAX = 256
_UNIT_ALPHABET = "letters, digits, ':-_.\\@' and the glob characters '*?[]!'"
_MAX_PATH = 4096


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
    units = section.get("allow_units")
    cgroups = section.get("allow_cgroups")
    exes = section.get("allow_exe")
    return ProgramPolicy(
        units=None if units is None else _list(units, f"{where}.allow_units", _unit),
        cgroups=None if cgroups is None else _list(cgroups, f"{where}.allow_cgroups", _cgroup),
        exes=None if exes is None else _list(exes, f"{where}.allow_exe", _exe),
    )


def refusal(policy: ProgramPolicy, who: Requester) -> Refusal | None:
    """None if `who` passes every check `policy` sets, else the first check it fails."""
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
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _match(pattern[1:], parts[1:])


def _shown_cgroup(who: Requester) -> str:
    if who.trusted == who.cgroup:
        return field(who.cgroup)
    # Below a delegated cgroup its owner names the groups: only the delegated one counts.
    return f"{field(who.trusted)} (delegated; the requester is in {field(who.cgroup)})"


def _list(value: object, where: str, check: Callable[[str, str], None]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of strings")
    items = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{where}: {item!r} is not a non-empty string")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in item):
            raise ConfigError(f"{where}: {item!r} holds a control character")
        check(item, where)
        items.append(item)
    return tuple(items)


def _unit(item: str, where: str) -> None:
    if len(item) > _UNIT_MAX or not _UNIT_CHARS.issuperset(item):
        raise ConfigError(f"{where}: {item!r} is not a unit name or glob ({_UNIT_ALPHABET})")
    if not any(item.endswith(s) and len(item) > len(s) for s in UNIT_SUFFIXES):
        raise ConfigError(
            f"{where}: {item!r} must end in a literal unit suffix that holds processes "
            f"({', '.join(UNIT_SUFFIXES)}); match a slice with allow_cgroups"
        )


def _cgroup(item: str, where: str) -> None:
    if len(item) > _MAX_PATH or not item.startswith("/"):
        raise ConfigError(f"{where}: {item!r} must be an absolute cgroup path glob")
    parts = _parts(item)
    if any(part in ("", ".", "..") for part in parts):
        raise ConfigError(f"{where}: {item!r} has an empty, '.' or '..' component")
    if any("**" in part and part != "**" for part in parts):
        raise ConfigError(f"{where}: {item!r}: '**' must be a whole path component")


def _exe(item: str, where: str) -> None:
    if len(item) > _MAX_PATH or not item.startswith("/") or item.startswith("//"):
        raise ConfigError(f"{where}: {item!r} must be an absolute path")
    if os.path.normpath(item) != item:
        raise ConfigError(f"{where}: {item!r} is not normalized (no '.', '..', '//' or '/' end)")
    if any(ch in item for ch in "*?["):
        raise ConfigError(f"{where}: {item!r}: allow_exe takes exact paths, not globs")
