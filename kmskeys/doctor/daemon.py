"""Which path a miss takes, and why: the resolver daemon through kmskeys-gate, the handler as
its fallback (the daemon down or refused), or the handler alone (no daemon configured)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from kmskeys.checkreport import ConfigLoaded
from kmskeys.doctor.finding import FAIL, INFO, OK, WARN, Finding, q
from kmskeys.doctor.fixes import install_fix, resolver_command
from kmskeys.rules import Rule
from kmskeys.trust import peer_uid


def check_daemon_path(
    config: ConfigLoaded, config_path: Path, rule: Rule | None, prefix: str
) -> Iterator[Finding]:
    """Which path a miss takes, and why (the rule's gate settings, the daemon's socket)."""
    value = config["warm_socket"]
    if value is None:
        yield Finding(
            INFO,
            "daemon",
            "no resolver daemon: each miss starts the handler (a Python start, tens of ms); set "
            "warm_socket and run kmskeys-resolver serve for misses without one (docs/resolver.md)",
        )
        return
    path = Path(value)
    settings = rule.gate_settings if rule is not None else None
    if settings is not None and str(path) not in settings:
        yield Finding(
            WARN,
            "daemon",
            f"warm_socket {path} is set, but the installed rule does not hand misses to it: "
            "every miss starts the handler until install writes the rule again",
            install_fix(config_path, prefix),
        )
        return
    if os.geteuid() != 0:
        yield Finding(
            INFO,
            "daemon",
            f"the resolver daemon at {path} answers root only; run doctor as root to check it",
        )
        return
    yield from _daemon_answers(path, config_path)


def _daemon_answers(path: Path, config_path: Path) -> Iterator[Finding]:
    """Whether a daemon the gate would trust listens at `path` (the gate's own checks)."""
    import socket

    from kmskeys import fileio

    try:
        fileio.check_path(
            path.parent, f"its directory {path.parent}", fileio.DIRECTORY, fileio.FOLLOW
        )
        fileio.check_path(path, f"warm_socket {path}", fileio.SOCKET)
    except fileio.UntrustedFileError as exc:
        if exc.problem != fileio.MISSING:
            yield Finding(
                FAIL,
                "daemon",
                f"{exc}: the gate refuses the daemon and runs the handler for every miss",
                f"chown root:root {q(path.parent)} && chmod 700 {q(path.parent)}",
            )
            return
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
                "daemon",
                f"warm_socket {path} is set but no daemon answers ({exc.strerror}): the gate runs "
                "the handler for every miss (a Python start each)",
                start,
            )
            return
    if uid != 0:
        yield Finding(
            FAIL,
            "daemon",
            f"warm_socket {path} is served by uid {uid}: the gate refuses it and runs the handler",
            f"fuser -k {q(path)}; rm -f {q(path)}",
        )
        return
    yield Finding(
        OK,
        "daemon",
        f"misses go to the resolver daemon on {path} through kmskeys-gate, no Python start; the "
        "handler answers if it does not accept one within daemon_wait",
    )
