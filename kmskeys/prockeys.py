"""/proc/keys, read the one way root may trust it: every line confirmed by the kernel first.

The kernel prints a key's description raw, and a description may hold a newline: any user whose
key a process can view (its own, or one in a keyring it shares) can forge whole lines in that
process's view of /proc/keys, naming any serial with any owner, group, type and description.
So a serial taken from a line is never acted on as read: `keyctl_describe` of that serial must
give the same type, owner, group, permissions and description; a line that does not parse or
does not match is skipped, never fatal. What describe cannot confirm (the flags, the expiry)
is shown, never relied on. Used by `kmskeys show`, `flush`, root's host-wide flush, doctor and
the client's explanation of a cached failure. Stdlib and the keyutils binding only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from kmskeys import keyutils
from kmskeys.errors import KeyctlError

PROC_KEYS = "/proc/keys"
# /proc/keys prints a timeout as one figure with a unit (security/keys/proc.c).
_UNITS = {"s": "s", "m": "min", "h": "h", "d": "days", "w": "weeks"}


class ProcKey:
    """One key as /proc/keys lists it: serial, flags, expiry, owner, type, description; never a
    payload. From `keys()`, the serial, type, uid, gid, perm and description are confirmed."""

    __slots__ = (
        "description",
        "expiry",
        "flags",
        "gid",
        "perm",
        "rest",
        "serial",
        "size",
        "type",
        "uid",
    )

    def __init__(self, line: str) -> None:
        # SERIAL FLAGS USAGE EXPIRY PERM UID GID TYPE DESCRIPTION[: SUMMARY]
        fields = line.split(None, 8)
        self.serial = int(fields[0], 16)
        self.flags = fields[1]
        self.expiry = fields[3]
        self.perm = int(fields[4], 16)
        self.uid, self.gid = int(fields[5]), int(fields[6])
        self.type = fields[7]
        self.rest = fields[8].rstrip("\n") if len(fields) > 8 else ""
        # `user` keys print "DESCRIPTION: DATALEN" once instantiated; negative ones only the
        # description; keyrings "DESCRIPTION: N" or "DESCRIPTION: empty". A description may
        # itself end in ": 5": `confirm` replaces this guess with the kernel's description.
        head, sep, tail = self.rest.rpartition(": ")
        self.size = int(tail) if sep and tail.isdigit() else None
        self.description = head if sep and (tail.isdigit() or tail == "empty") else self.rest

    @property
    def state(self) -> str:
        """instantiated, negative, revoked, invalidated, dead or constructing (from the flags,
        which nothing confirms: shown, never acted on)."""
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

    def confirm(self) -> bool:
        """Whether the kernel's own description of this serial is what the line says; if so,
        the description becomes the kernel's (exact, whatever it holds)."""
        try:
            raw = keyutils.keyctl_describe_alloc(self.serial)
        except KeyctlError:
            return False  # gone, invalidated, or not ours to view
        fields = raw.decode(errors="replace").split(";", 4)
        if len(fields) != 5:
            return False
        type_, uid, gid, perm, desc = fields
        try:
            same = (type_, int(uid), int(gid), int(perm, 16)) == (
                self.type,
                self.uid,
                self.gid,
                self.perm,
            )
        except ValueError:
            return False
        # The line holds the description, then ": SUMMARY" for most key types.
        if not same or not (self.rest == desc or self.rest.startswith(desc + ": ")):
            return False
        self.description = desc
        return True


def lines() -> Iterator[ProcKey]:
    """Every line of /proc/keys that parses, unconfirmed (for presence checks only)."""
    with open(PROC_KEYS, encoding="utf-8", errors="replace") as text:
        for line in text:
            try:
                yield ProcKey(line)
            except (ValueError, IndexError):
                continue  # a description's continuation, or anything else that is no key line


def keys(where: Callable[[ProcKey], bool] | None = None) -> dict[int, ProcKey]:
    """The keys /proc/keys lists for this process that `where` selects, each confirmed by
    keyctl_describe, by serial. Forged and unconfirmable lines are left out.

    `where` sees each line before confirmation (so that only candidates cost a syscall) and
    again after it, when the description is the kernel's.
    """
    found: dict[int, ProcKey] = {}
    for key in lines():
        if key.serial in found or (where is not None and not where(key)):
            continue
        if key.confirm() and (where is None or where(key)):
            found[key.serial] = key
    return found
