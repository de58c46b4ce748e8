"""/proc/key-users: each uid's kernel key quota, read one way for doctor and the resolver.

The kernel writes one line per uid holding keys (security/keys/proc.c, proc_key_users_show):
`  UID:     USAGE NKEYS/NIKEYS QNKEYS/MAXKEYS QNBYTES/MAXBYTES`. Only the kernel writes it, so
a line is never a requester's text; a line that does not parse is read as unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

PROC_KEY_USERS = Path("/proc/key-users")


class KeyQuota(NamedTuple):
    """One uid's kernel key quota: keys held and the most it may hold, bytes used and the most."""

    keys: int
    max_keys: int
    used: int
    max_bytes: int


def key_quota(uid: int, path: Path = PROC_KEY_USERS) -> KeyQuota | None:
    """`uid`'s quota, or None when it holds no keys (no line) or its line does not parse.

    Raises OSError when `path` cannot be read (each caller says what that means to it)."""
    for line in path.read_text().splitlines():
        head, _, rest = line.partition(":")
        fields = rest.split()
        if head.strip() != str(uid) or len(fields) != 4:
            continue
        try:
            keys, max_keys = (int(n) for n in fields[2].split("/"))
            used, max_bytes = (int(n) for n in fields[3].split("/"))
        except ValueError:
            return None
        return KeyQuota(keys, max_keys, used, max_bytes)
    return None
