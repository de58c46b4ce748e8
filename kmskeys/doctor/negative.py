"""Cached failures: negative keys under PREFIX: that requests of this process still meet."""

from __future__ import annotations

from collections.abc import Iterator

from kmskeys.cached import (
    KERNEL_NEGATIVE_TIMEOUT,
    answered_by_resolver,
    flush_command,
    negative_keys,
    no_resolver_cause,
)
from kmskeys.doctor.finding import OK, WARN, Finding


def check_negative_keys(prefix: str) -> Iterator[Finding]:
    """Each cached failure, with who put it there: the resolver's answer, or the kernel's own
    negation of a failed upcall (kmskeys/cached.py tells them apart)."""
    try:
        found = negative_keys(prefix)
    except OSError as exc:
        yield Finding(
            WARN, "cached", f"cannot read /proc/keys ({exc.strerror})", "mount -t proc proc /proc"
        )
        return
    for key in found:
        if answered_by_resolver(key):
            origin = "the resolver's answer"
        else:
            origin = (
                f"no resolver answered, and the kernel caches a failed upcall for "
                f"{KERNEL_NEGATIVE_TIMEOUT} s: {no_resolver_cause(prefix)}"
            )
        yield Finding(
            WARN,
            "cached",
            f"{key.description}: cached failure (negative key {key.serial}), expires "
            f"{key.expires}: requests fail at once, without asking the resolver, until then; "
            f"{origin}",
            flush_command(key.description),
        )
    if not found:
        yield Finding(OK, "cached", f"no cached failure under {prefix}: in this process's keyrings")
