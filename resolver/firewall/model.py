"""The firewall's shared model: errors, exit codes, allowed users, rule state, the backend
protocol, and running the backends' commands. nft.py and ipt.py build on this; cli.py ties them
together. No module here imports the package's others except this one.
"""

from __future__ import annotations

import pwd
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kmskeys.errors import KmsKeysError
from kmskeys.imds import IMDS_IPV4, IMDS_IPV6

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ABSENT = 3
EXIT_NOT_ROOT = 4
EXIT_MISSING_BINARY = 5

BACKENDS = ("nftables", "iptables")

# (family label, IMDS address) in the order rules, counters and reports use.
FAMILIES = (("ipv4", IMDS_IPV4), ("ipv6", IMDS_IPV6))

# Recorded in rule comments, so only names that need no quoting in nft or iptables syntax.
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")


class FirewallError(KmsKeysError):
    """The firewall could not be changed or read; the message says which command failed."""

    exit_code = EXIT_FAILED


class FirewallUsageError(FirewallError, ValueError):
    """Bad arguments, such as an unknown `--allow-user`; nothing was applied, fix the command."""

    exit_code = EXIT_USAGE


class NotRootError(FirewallError, PermissionError):
    """Changing or reading firewall rules needs root; run the command with sudo."""

    exit_code = EXIT_NOT_ROOT


class MissingBinaryError(FirewallError, FileNotFoundError):
    """The backend's command is not installed; install the Debian package the message names."""

    exit_code = EXIT_MISSING_BINARY


@dataclass(frozen=True, order=True)
class AllowedUser:
    """A user whose sockets may reach IMDS, resolved to a uid when the rules are built."""

    uid: int
    name: str

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid})"


ROOT = AllowedUser(0, "root")


@dataclass
class RuleState:
    """What one backend has in place: the allowed users and the reject counters by hook/family."""

    backend: str
    where: str
    allowed: list[AllowedUser] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)


class FirewallBackend(Protocol):
    """One way to install the rules: nftables or iptables."""

    name: str
    package: str
    commands: tuple[str, ...]

    def render(self, users: Sequence[AllowedUser]) -> str:
        """The ruleset `apply` would load, in the backend's own file syntax."""

    def apply(self, users: Sequence[AllowedUser]) -> None:
        """Install the rules atomically, replacing any earlier copy of ours."""

    def remove(self) -> bool:
        """Remove exactly what `apply` made; False if there was nothing."""

    def state(self) -> RuleState | None:
        """The rules in place, or None if there are none of ours."""


def run(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run a firewall command and return its stdout; a failure raises FirewallError with stderr."""
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode != 0:
        message = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise FirewallError(f"`{' '.join(argv[:3])}` failed: {message}")
    return proc.stdout


def resolve_user(given: str) -> AllowedUser:
    """One user, by name or numeric uid, from the passwd database; unknown users fail."""
    try:
        entry = pwd.getpwuid(int(given)) if given.isdigit() else pwd.getpwnam(given)
    except (KeyError, OverflowError):
        raise FirewallUsageError(
            f"unknown user {given!r}: no such user in the passwd database; nothing applied"
        ) from None
    if not _USER_NAME.fullmatch(entry.pw_name):
        raise FirewallUsageError(f"user name {entry.pw_name!r} cannot be recorded in a rule")
    return AllowedUser(entry.pw_uid, entry.pw_name)


def resolve_users(names: Sequence[str]) -> list[AllowedUser]:
    """Root plus each named user, resolved to uids now (the rules match uids, not names)."""
    users = {ROOT.uid: ROOT}
    for user in map(resolve_user, names):
        users.setdefault(user.uid, user)
    return sorted(users.values())


def parse_user_comment(uid: int, comment: str | None) -> AllowedUser:
    """An allowed user read back from a rule: the recorded name, else the name passwd gives."""
    if comment:
        return AllowedUser(uid, comment.removeprefix("kmskeys allow ").strip())
    try:
        return AllowedUser(uid, pwd.getpwuid(uid).pw_name)
    except KeyError:
        return AllowedUser(uid, str(uid))
