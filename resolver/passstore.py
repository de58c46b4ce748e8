"""`pass:` entries read as the requesting user: the entry opened as the user, then decrypted
by gpg as the user (the two halves: resolver/passentry.py and resolver/gpgdecrypt.py).

The resolver runs as root; the store and the GnuPG key belong to the requester (the kernel's
%u), so nothing reads as root what the user could not read, and gpg never runs as root. The
checks, the agent's states and the failure classes are in docs/tokens.md.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from kmskeys.contract import USER_PAYLOAD_MAX
from kmskeys.passname import PassQuery
from kmskeys.passname import select as select_part
from resolver import gpgdecrypt
from resolver.passentry import (
    GNUPG_TEMPLATE,
    STORE_TEMPLATE,
    AgentLockedError,
    AgentNotRunningError,
    GpgMissingError,
    PassEntryMissing,
    PassLocation,
    PassRefusedError,
    locate,
    open_entry,
)

if TYPE_CHECKING:
    from resolver.backend import Timings


def resolve(
    location: PassLocation,
    name: str,
    query: PassQuery,
    deadline: float,
    *,
    timings: Timings | None = None,
    gpg: str | None = None,
) -> bytes:
    """The part of entry `name` that `query` selects: 1..32767 bytes, or a ResolverError.

    `gpg` is the gpg program (root's config; resolver.gpgdecrypt.GPG by default)."""
    entry = read_entry(location, name, deadline, timings=timings, gpg=gpg)
    try:
        part = select_part(entry, query)
    except LookupError:
        raise PassRefusedError(
            f"pass entry {name!r} of {location.user} has no {query.field!r} field"
        ) from None
    if not part:
        raise PassRefusedError(
            f"the selected part of pass entry {name!r} of {location.user} is empty, "
            "which a key cannot hold"
        )
    return part


def read_entry(
    location: PassLocation,
    name: str,
    deadline: float,
    *,
    limit: int = USER_PAYLOAD_MAX,
    timings: Timings | None = None,
    gpg: str | None = None,
) -> bytes:
    """The whole decrypted entry `name` (validated by the caller), at most `limit` bytes."""
    start = time.perf_counter()
    fd = open_entry(location, name)
    try:
        return gpgdecrypt.decrypt(
            location, name, fd, deadline, limit=limit, gpg=gpg or gpgdecrypt.GPG
        )
    finally:
        os.close(fd)
        if timings is not None:
            timings.add("gpg", (time.perf_counter() - start) * 1000)


__all__ = [
    "GNUPG_TEMPLATE",
    "STORE_TEMPLATE",
    "AgentLockedError",
    "AgentNotRunningError",
    "GpgMissingError",
    "PassEntryMissing",
    "PassLocation",
    "PassRefusedError",
    "locate",
    "open_entry",
    "read_entry",
    "resolve",
]
