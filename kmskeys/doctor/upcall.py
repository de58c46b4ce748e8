"""Whether a miss runs request-key here, for root and for a non-root requester (probed)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from kmskeys.doctor.finding import FAIL, INFO, OK, WARN, Finding
from kmskeys.doctor.keyctl import REQUEST_KEY
from kmskeys.upcall_probe import probe_upcalls


def check_upcalls() -> Iterator[Finding]:
    """Whether a miss runs request-key here, for root and for a non-root requester (probed)."""
    if os.geteuid() != 0:
        yield Finding(
            INFO,
            "upcall",
            "upcall probe not run (its throwaway rule in /etc/request-key.d needs root): a miss "
            "that fails at once with ENOENT means request-key does not run for this user; run "
            "doctor as root to probe",
        )
        return
    try:
        caps = probe_upcalls()
    except (OSError, ValueError) as exc:
        yield Finding(
            WARN, "upcall", f"upcall probe could not run ({exc})", "kmskeys doctor (as root)"
        )
        return
    if not caps.root.works:
        yield Finding(
            FAIL,
            "upcall",
            f"a root request under a throwaway rule did not resolve, {caps.root}: no miss can "
            f"resolve here",
            f"keyctl request2 user debug:kmskeys-doctor x @s  # then check {REQUEST_KEY} runs",
        )
    elif not caps.non_root.works:
        yield Finding(
            WARN,
            "upcall",
            f"request-key does not run for non-root requesters here (uid {caps.uid}: "
            f"{caps.non_root}): misses of apps running as non-root never resolve; a property "
            "of this kernel, which no command changes: resolve their secrets as root on their "
            "behalf before each ttl ends (docs/reliability.md, hosts that refuse non-root "
            "upcalls)",
        )
    else:
        yield Finding(
            OK,
            "upcall",
            f"request-key runs for root and for a non-root requester (probed as uid {caps.uid})",
        )
