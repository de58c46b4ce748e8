"""IMDS must be unreachable by app users: only root and the resolver may reach it."""

from __future__ import annotations

from collections.abc import Iterator

from kmskeys import imds
from kmskeys.doctor.finding import FAIL, INFO, OK, WARN, Finding
from kmskeys.doctor.fixes import resolver_command
from kmskeys.upcall_probe import nobody


def _probe_as_nobody() -> list[imds.ProbeResult] | None:
    """IMDS as seen by uid nobody (root only)."""
    return imds.probe_as_user(*nobody(), 0.5)


def imds_findings(
    uid: int, mine: list[imds.ProbeResult], as_nobody: list[imds.ProbeResult] | None
) -> Iterator[Finding]:
    """IMDS must be unreachable by app users: only root and the resolver may reach it."""
    reachable = [r for r in mine if r.reachable]
    fix = f"{resolver_command()} firewall apply"
    if uid != 0:
        if not reachable:
            shown = ", ".join(str(r) for r in mine)
            yield Finding(OK, "imds", f"IMDS not reachable by uid {uid} ({shown})")
        else:
            yield Finding(
                FAIL,
                "imds",
                f"IMDS reachable by uid {uid} ({reachable[0].endpoint}): this user can borrow the "
                "instance role and decrypt every blob of this host",
                fix + "  # as root",
            )
        return
    if not reachable:
        shown = ", ".join(str(r) for r in mine)
        yield Finding(
            INFO,
            "imds",
            f"IMDS not reachable even by root ({shown}): off EC2, credentials come from "
            "shared_credentials_file (docs/resolver.md, off EC2)",
        )
        return
    others = [r for r in as_nobody or [] if r.reachable]
    if as_nobody is None:
        yield Finding(WARN, "imds", "could not probe IMDS as uid nobody", "kmskeys doctor --json")
    elif others:
        yield Finding(
            FAIL,
            "imds",
            f"IMDS reachable by root and by uid nobody ({others[0].endpoint}): no firewall "
            "keeps app users off the instance role",
            fix,
        )
    else:
        yield Finding(
            OK,
            "imds",
            f"IMDS reachable by root ({reachable[0].endpoint}), as the resolver needs, and not "
            "by uid nobody",
        )
