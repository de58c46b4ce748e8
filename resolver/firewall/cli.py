"""`kmskeys-resolver firewall`: only root and the resolver's users may reach the EC2 instance role.

An app user who can reach the instance metadata service (IMDS) can take the host's instance role
and decrypt every blob the host can, voiding the per-name and per-user bindings. These rules
reject TCP to the IMDS addresses from every socket not owned by root or an `--allow-user` user,
and all TCP to them forwarded for local containers (an owner match never applies to forwarded
packets). Rejects are fast (TCP reset) so an app fails at once, and counted for `status`.

Exit codes: 0 done (for `status`: the rules are present); 1 a backend command failed;
2 bad usage (e.g. an unknown user); 3 `status`: the rules are not present;
4 not root; 5 the backend's command is missing (the message names the Debian package).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import sys

from kmskeys.imds import ProbeResult, probe, probe_as_user
from resolver.firewall.ipt import IptablesBackend
from resolver.firewall.model import (
    BACKENDS,
    EXIT_ABSENT,
    EXIT_OK,
    AllowedUser,
    FirewallBackend,
    FirewallError,
    MissingBinaryError,
    NotRootError,
    RuleState,
    resolve_user,
    resolve_users,
)
from resolver.firewall.nft import NftBackend


def _backend(name: str) -> FirewallBackend:
    return NftBackend() if name == "nftables" else IptablesBackend()


def _installed(backend: FirewallBackend) -> bool:
    return all(shutil.which(cmd) for cmd in backend.commands)


def _require(backend: FirewallBackend) -> None:
    missing = [cmd for cmd in backend.commands if shutil.which(cmd) is None]
    if missing:
        raise MissingBinaryError(
            f"backend {backend.name}: command {', '.join(missing)} not found; "
            f"install it with `apt-get install {backend.package}`"
        )


def _choose(name: str) -> FirewallBackend:
    """The backend to apply with: the one named, or for `auto` nftables if `nft` is present."""
    if name != "auto":
        backend = _backend(name)
        _require(backend)
        return backend
    for candidate in BACKENDS:
        backend = _backend(candidate)
        if _installed(backend):
            return backend
    raise MissingBinaryError(
        "no firewall backend found (neither nft nor iptables); "
        "install one with `apt-get install nftables` or `apt-get install iptables`"
    )


def _candidates(name: str) -> list[FirewallBackend]:
    """Backends to inspect for `status`/`remove`: for `auto`, every installed one."""
    if name != "auto":
        return [_choose(name)]
    found = [b for b in map(_backend, BACKENDS) if _installed(b)]
    if not found:
        _choose("auto")  # raises the clear error
    return found


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise NotRootError(f"firewall {action} needs root (CAP_NET_ADMIN); run it with sudo")


def probe_as(user: AllowedUser | None, timeout: float = 0.5) -> list[ProbeResult]:
    """Probe IMDS as the current user, or as `user` from a forked child that drops to its uid."""
    if user is None:
        return probe(timeout)
    found = probe_as_user(user.uid, pwd.getpwuid(user.uid).pw_gid, timeout)
    if found is None:
        raise FirewallError(f"could not probe IMDS as {user}")
    return found


def _format_state(state: RuleState) -> list[str]:
    counts = ", ".join(f"{label} {n}" for label, n in state.rejected.items())
    return [
        f"{state.backend}: rules present ({state.where})",
        "  allowed users: " + ", ".join(map(str, state.allowed)),
        f"  rejected packets: {counts}",
    ]


def _status(backends: list[FirewallBackend], probe_user: AllowedUser | None) -> int:
    states = [s for s in (b.state() for b in backends) if s is not None]
    lines = [line for s in states for line in _format_state(s)]
    if not states:
        lines.append(f"rules not present ({', '.join(b.name for b in backends)} checked)")
    me = pwd.getpwuid(os.geteuid()).pw_name
    who = [None, probe_user] if probe_user else [None]
    for user in who:
        label = str(user) if user else f"{me} (uid {os.geteuid()}, this process)"
        results = probe_as(user)
        lines.append(f"imds as {label}: " + ", ".join(map(str, results)))
    print("\n".join(lines))
    return EXIT_OK if states else EXIT_ABSENT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmskeys-resolver firewall",
        description="Allow the EC2 instance metadata service (169.254.169.254, fd00:ec2::254) "
        "to root and the --allow-user users only; reject everyone else fast.",
        epilog="exit codes: 0 ok (status: rules present), 1 backend command failed, "
        "2 bad usage or unknown user, 3 status: rules not present, 4 not root, "
        "5 backend command missing",
    )
    parser.add_argument(
        "action",
        choices=("apply", "remove", "status", "print"),
        help="apply or remove the rules, show their state, or print them without applying",
    )
    parser.add_argument(
        "--backend",
        choices=(*BACKENDS, "auto"),
        default="auto",
        help="auto (default) prefers nftables when `nft` is installed; for status and remove "
        "it looks at every installed backend",
    )
    parser.add_argument(
        "--allow-user",
        action="append",
        default=[],
        metavar="USER",
        help="a user (name or uid) besides root whose sockets may reach IMDS; repeatable",
    )
    parser.add_argument(
        "--probe-as",
        metavar="USER",
        help="status: also probe IMDS as this user, e.g. an app user",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kmskeys-resolver firewall`; returns the documented exit code."""
    args = _parser().parse_args(argv)
    try:
        users = resolve_users(args.allow_user)
        probe_user = resolve_user(args.probe_as) if args.probe_as else None
        if args.action == "print":
            backend = _backend(args.backend) if args.backend != "auto" else _print_backend()
            sys.stdout.write(backend.render(users))
            return EXIT_OK
        _require_root(args.action)
        if args.action == "apply":
            backend = _choose(args.backend)
            backend.apply(users)
            print(f"{backend.name}: applied; IMDS allowed to " + ", ".join(map(str, users)))
            return EXIT_OK
        backends = _candidates(args.backend)
        if args.action == "remove":
            removed = [b.name for b in backends if b.remove()]
            print(f"{', '.join(removed)}: removed" if removed else "nothing to remove")
            return EXIT_OK
        return _status(backends, probe_user)
    except FirewallError as exc:
        print(f"kmskeys-resolver firewall: {exc}", file=sys.stderr)
        return exc.exit_code


def _print_backend() -> FirewallBackend:
    """For `print --backend auto`: the backend apply would use, nftables if none is installed."""
    for candidate in BACKENDS:
        backend = _backend(candidate)
        if _installed(backend):
            return backend
    return _backend("nftables")
