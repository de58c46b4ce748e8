"""Cached failures: the negative keys this process's keyrings hold, found through /proc/keys.

A refusal or an unknown name is answered with a negative key that request_key(2) returns again,
without an upcall, until it expires. That key is the only trace of the earlier failure, so the
client names it in its error (and `kmskeys doctor` lists them): which key, and when it expires.
Stdlib and the keyutils binding only; imported on failure paths only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kmskeys import keyutils
from kmskeys.errors import ERRNO_CACHED, KeyctlError, KmsKeysError, error_for_errno

PROC_KEYS = Path("/proc/keys")
# The keyrings `kmskeys flush` unlinks from: a negative key reachable from them is one a request
# of this process can meet, and one flush can remove.
OWN_KEYRINGS = (
    keyutils.KEY_SPEC_THREAD_KEYRING,
    keyutils.KEY_SPEC_PROCESS_KEYRING,
    keyutils.KEY_SPEC_SESSION_KEYRING,
    keyutils.KEY_SPEC_USER_KEYRING,
    keyutils.KEY_SPEC_USER_SESSION_KEYRING,
)
# /proc/keys prints a timeout as one figure with a unit (security/keys/proc.c).
_UNITS = {"s": "s", "m": "min", "h": "h", "d": "days", "w": "weeks"}


class ProcKeyLine:
    """One line of /proc/keys: serial, flags, expiry, owner, type, description; never a payload."""

    __slots__ = ("description", "expiry", "flags", "gid", "serial", "size", "type", "uid")

    def __init__(self, line: str) -> None:
        # SERIAL FLAGS USAGE EXPIRY PERM UID GID TYPE DESCRIPTION[: SUMMARY]
        fields = line.split(None, 8)
        self.serial = int(fields[0], 16)
        self.flags = fields[1]
        self.expiry = fields[3]
        self.uid, self.gid = int(fields[5]), int(fields[6])
        self.type = fields[7]
        rest = fields[8].rstrip("\n") if len(fields) > 8 else ""
        # `user` keys print "DESCRIPTION: DATALEN" once instantiated; negative ones only the
        # description; keyrings "DESCRIPTION: N" or "DESCRIPTION: empty".
        head, sep, tail = rest.rpartition(": ")
        self.size = int(tail) if sep and tail.isdigit() else None
        self.description = head if sep and (tail.isdigit() or tail == "empty") else rest

    @property
    def state(self) -> str:
        """instantiated, negative, revoked, invalidated, dead or constructing."""
        for flag, name in (
            ("i", "invalidated"),
            ("D", "dead"),
            ("R", "revoked"),
            ("N", "negative"),
        ):
            if flag in self.flags:
                return name
        return "constructing" if "U" in self.flags else "instantiated"

    @property
    def negative(self) -> bool:
        """Rejected or negated (flag N), and neither invalidated nor dead yet."""
        return "N" in self.flags and "i" not in self.flags and "D" not in self.flags

    @property
    def expires(self) -> str:
        """`in 53 s`, `in 2 min` (the kernel rounds down), `never` or `now`."""
        if self.expiry == "perm":
            return "never"
        if self.expiry == "expd":
            return "now"
        figure, unit = self.expiry[:-1], self.expiry[-1:]
        return f"in {figure} {_UNITS.get(unit, unit)}"


def proc_keys() -> dict[int, ProcKeyLine]:
    """Every key /proc/keys shows this process, by serial."""
    found = {}
    with PROC_KEYS.open() as lines:
        for line in lines:
            try:
                key = ProcKeyLine(line)
            except (ValueError, IndexError):
                continue  # a description may hold a newline: its continuation is no key line
            found[key.serial] = key
    return found


def _reachable(keys: dict[int, ProcKeyLine]) -> Iterator[int]:
    """Serials linked from this process's own keyrings, nested keyrings included."""
    seen: set[int] = set()
    pending = []
    for spec in OWN_KEYRINGS:
        try:
            pending.append(keyutils.keyctl_get_keyring_ID(spec, False))
        except KeyctlError:
            continue  # this process has no such keyring
    while pending:
        ring = pending.pop()
        if ring in seen:
            continue
        seen.add(ring)
        try:
            members = memoryview(keyutils.keyctl_read(ring)).cast("i").tolist()
        except KeyctlError:
            continue
        for serial in members:
            yield serial
            if serial in keys and keys[serial].type == "keyring":
                pending.append(serial)


def negative_keys(prefix: str | None = None) -> list[ProcKeyLine]:
    """The negative `user` keys this process's keyrings hold, under `prefix:` when given."""
    keys = proc_keys()
    wanted = {
        serial
        for serial, key in keys.items()
        if key.negative
        and key.type == "user"
        and (prefix is None or key.description.startswith(prefix + ":"))
    }
    if not wanted:
        return []
    found = {serial for serial in _reachable(keys) if serial in wanted}
    return sorted((keys[s] for s in found), key=lambda k: k.description)


def cached_failure(description: str) -> ProcKeyLine | None:
    """The negative key `description` this process's keyrings hold, if any (None on error)."""
    prefix = description.partition(":")[0]
    try:
        found = [k for k in negative_keys(prefix) if k.description == description]
    except (OSError, ValueError):
        return None
    return found[0] if found else None


def flush_command(description: str) -> str:
    """The `kmskeys flush` command line that drops a cached failure of `description`."""
    from kmskeys.contract import DEFAULT_PREFIX

    prefix, _, name = description.partition(":")
    shown = name if _shell_safe(name) else "'" + name.replace("'", "'\\''") + "'"
    option = "" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}"
    return f"kmskeys flush {shown}{option}"


def _shell_safe(text: str) -> bool:
    return bool(text) and all(ch.isalnum() or ch in "_./@+-:" for ch in text)


def explained(exc: KmsKeysError, description: str) -> KmsKeysError:
    """`exc` from a request for `description`, naming the cached failure that holds it, if any."""
    if exc.errno not in ERRNO_CACHED:
        return exc
    negative = cached_failure(description)
    if negative is None:
        return exc
    note = (
        f"cached failure (key {negative.serial}), expires {negative.expires}; "
        f"`{flush_command(description)}` to retry now"
    )
    return error_for_errno(
        exc.errno,
        "request_key " + description[:256],
        upcall=True,
        description=description,
        cached=note,
    )
