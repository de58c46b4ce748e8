"""Whether misses go through the warm daemon or decrypt cold (bench/results.md: how long)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from kmskeys.checkreport import ConfigLoaded
from kmskeys.doctor.finding import FAIL, INFO, OK, WARN, Finding, q
from kmskeys.doctor.fixes import resolver_command
from kmskeys.trust import peer_uid


def check_warm_daemon(config: ConfigLoaded, config_path: Path) -> Iterator[Finding]:
    """Whether misses go through the warm daemon or decrypt cold (bench/results.md: how long)."""
    value = config["warm_socket"]
    if value is None:
        yield Finding(
            INFO,
            "warm",
            "warm daemon off: each miss loads botocore; for faster misses set warm_socket and "
            "run kmskeys-resolver serve (docs/resolver.md)",
        )
        return
    path = Path(value)
    if os.geteuid() != 0:
        yield Finding(
            INFO, "warm", f"warm daemon at {path} answers root only; run doctor as root to check it"
        )
        return
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(1.0)
        try:
            conn.connect(os.fspath(path))
            uid = peer_uid(conn)
        except OSError as exc:
            start = (
                "systemctl enable --now kmskeys-resolver"
                if Path("/run/systemd/system").is_dir()
                else f"setsid {resolver_command(config_path)} serve --config {q(config_path)} "
                "</dev/null >/dev/null 2>&1 &"
            )
            yield Finding(
                WARN,
                "warm",
                f"warm_socket {path} set but no daemon answers ({exc.strerror}): misses decrypt "
                "cold",
                start,
            )
            return
    if uid != 0:
        yield Finding(
            FAIL,
            "warm",
            f"warm_socket {path} is served by uid {uid}: the handler refuses it",
            f"fuser -k {q(path)}; rm -f {q(path)}",
        )
        return
    yield Finding(OK, "warm", f"warm daemon answering on {path}")
