"""Keys a test session left behind: a live key whose description holds a name or prefix this
session handed out (tests/support/names.py), still listed in /proc/keys once the session is done.

Such a key sits in a keyring that outlives the test (root's user or persistent keyring, a
keyring it is linked from): every later session and every other helper on this kernel meets it.
Keys that are revoked, invalidated, dead or expired are on their way out (the key GC removes
them, revoked and expired ones after `kernel.keys.gc_delay`) and do not count; nor do keys
another session on this kernel made, whose names this process never issued.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from kmskeys import prockeys

# The key GC frees an unlinked key from a workqueue, soon after its last link goes.
GC_WAIT = 5.0


def _live(key: prockeys.ProcKey) -> bool:
    return not any(flag in key.flags for flag in "RDi") and key.expiry != "expd"


def leftover(names: Collection[str]) -> list[str]:
    """`SERIAL TYPE uid=UID DESCRIPTION` of each live key whose description holds one of names."""
    if not names:
        return []

    def ours(key: prockeys.ProcKey) -> bool:
        return _live(key) and any(name in key.description for name in names)

    found = prockeys.keys(ours)
    return [f"{s:08x} {k.type} uid={k.uid} {k.description!r}" for s, k in sorted(found.items())]


def leftover_after_gc(names: Collection[str], wait: float = GC_WAIT) -> list[str]:
    """`leftover`, once the keys unlinked last have had `wait` seconds to be collected."""
    deadline = time.monotonic() + wait
    while True:
        found = leftover(names)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def flush_install(values: dict[str, object]) -> None:
    """Root's host-wide flush of every prefix a test install served (its settings ending in
    `prefix`): every uid's keys the resolver made under them, and their host-cache entries,
    which uninstall leaves (they expire with their ttl, up to an hour later)."""
    from kmskeys.hostflush import flush_host

    for setting, prefix in values.items():
        if setting.endswith("prefix") and isinstance(prefix, str):
            flush_host(prefix, None)
