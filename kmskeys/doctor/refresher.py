"""Refresh-ahead configured, and a refresher running to renew what the resolver records."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kmskeys.checkreport import ConfigLoaded
from kmskeys.doctor.finding import INFO, OK, WARN, Finding, q
from kmskeys.doctor.fixes import resolver_command


def check_refresher(config: ConfigLoaded, config_path: Path) -> Iterator[Finding]:
    """With refresh_ahead on, a refresh loop must hold its lock, else keys expire as before."""
    if not config.get("refresh_ahead"):
        return
    running = config.get("refresher")
    if running is None:
        yield Finding(
            INFO, "refresh", "refresh_ahead is on; run doctor as root to see a refresher runs"
        )
    elif running:
        yield Finding(OK, "refresh", "refresh_ahead is on and a refresher runs")
    else:
        start = (
            "systemctl enable --now kmskeys-refresh"
            if Path("/run/systemd/system").is_dir()
            else f"setsid {resolver_command(config_path)} refresh --config {q(config_path)} "
            "</dev/null >/dev/null 2>&1 &"
        )
        records = config.get("refresh_records") or 0
        if not records:
            # Nothing recorded yet: no key waits for a renewal, so nothing is lost yet.
            yield Finding(
                INFO,
                "refresh",
                "refresh_ahead is on (the default) but no refresher runs: the keys the resolver "
                f"answers will expire as without it; to renew them in place: {start}",
            )
            return
        yield Finding(
            WARN,
            "refresh",
            f"refresh_ahead is on and {records} answered keys are recorded, but no refresher "
            "runs (kmskeys-resolver refresh, or the warm daemon): they expire, and each expiry "
            "costs a miss",
            start,
        )
