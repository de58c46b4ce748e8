"""`kmskeys-resolver`: handle (run by /sbin/request-key), install, uninstall, firewall.

argparse is imported by the commands that parse options only: `handle` runs for every miss, and
importing argparse would cost it milliseconds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = """\
usage: kmskeys-resolver COMMAND [ARGS...]

  handle [--config PATH] %k %d %u %g %T %P %S
                 the request-key handler (run by /sbin/request-key, as root)
  install [--config PATH] [--prefix P] [--key-arn ARN ...] [--rules BACKEND,...|both|all]
                 write the request-key rule(s), and a config, blob_dir and keystore when missing
  uninstall [--config PATH] [--prefix P]
                 remove exactly what install wrote
  check [--config PATH]
                 the handler's verdict on a config, its dependencies and blob files (JSON,
                 for `kmskeys doctor`); decrypts nothing
  serve [--config PATH]
                 the optional resolver daemon: kmskeys-gate hands it every miss, so that no
                 interpreter starts (warm_socket in the config; the handler is the fallback)
  prefetch [--config PATH] [--concurrency N] [--jitter S] [NAME ...]
                 fill the host cache from blob_dir (at boot: kmskeys-prefetch.service)
  refresh [--config PATH] [--once]
                 renew answered keys in place before they expire (kmskeys-refresh.service);
                 --once: renew every recorded key now, then exit
  stored create|rotate NAME [--uid U | --machine] [--size N] | stored list | stored accounts
  stored retire --uid U | stored restore --uid U ACCOUNT | stored migrate | stored userdel-hook
                 the keystore: make or add a version of a key (rotate flushes its cached
                 #latest), list it (metadata only), retire an account's keys (docs/dpapi.md)
  firewall ...   keep IMDS reachable by root only (see `kmskeys-resolver firewall --help`)
"""


def _install_command(command: str, argv: Sequence[str]) -> int:
    import argparse

    from resolver import config as config_mod
    from resolver import install as install_mod
    from resolver.errors import InstallError

    parser = argparse.ArgumentParser(prog=f"kmskeys-resolver {command}")
    parser.add_argument(
        "--config",
        type=Path,
        default=config_mod.DEFAULT_PATH,
        help="resolver config file (default: %(default)s)",
    )
    parser.add_argument("--prefix", help="description namespace (default: the config's, or kms)")
    if command == "install":
        parser.add_argument(
            "--key-arn",
            action="append",
            default=[],
            metavar="ARN",
            help="a KMS key ARN the resolver may use (key_arns); repeatable",
        )
        parser.add_argument(
            "--rules",
            default="kms",
            help="the backends whose requests the rule routes to the handler: a comma-separated "
            "list of kms, stored, pass, token; both (kms,stored) or all (default: kms)",
        )
    args = parser.parse_args(argv)
    try:
        if command == "install":
            lines = install_mod.install(
                args.config, args.prefix, key_arns=args.key_arn, rules=args.rules
            )
        else:
            lines = install_mod.uninstall(args.config, args.prefix)
        for line in lines:
            print(line)
    except (InstallError, OSError) as exc:
        print(f"kmskeys-resolver {command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve(argv: Sequence[str]) -> int:
    import argparse

    from resolver import config as config_mod
    from resolver.daemon import serve
    from resolver.errors import ResolverError

    parser = argparse.ArgumentParser(
        prog="kmskeys-resolver serve",
        description="Run the resolver daemon on the config's warm_socket (as root).",
    )
    parser.add_argument("--config", type=Path, default=config_mod.DEFAULT_PATH)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("kmskeys-resolver serve: must run as root", file=sys.stderr)
        return 1
    try:
        return serve(config_mod.load(args.config))
    except (ResolverError, OSError) as exc:
        print(f"kmskeys-resolver serve: {exc}", file=sys.stderr)
        return 1


def _prefetch(argv: Sequence[str]) -> int:
    import argparse

    from resolver import config as config_mod
    from resolver import prefetch as prefetch_mod
    from resolver.errors import ResolverError

    parser = argparse.ArgumentParser(
        prog="kmskeys-resolver prefetch",
        description="Fill the host cache from blob_dir (as root); user-bound blobs are skipped.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="default: every blob")
    parser.add_argument("--config", type=Path, default=config_mod.DEFAULT_PATH)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=prefetch_mod.DEFAULT_CONCURRENCY,
        help="KMS calls at once (default: %(default)s)",
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=prefetch_mod.DEFAULT_JITTER,
        help="each name waits a random 0..JITTER seconds first (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("kmskeys-resolver prefetch: must run as root", file=sys.stderr)
        return 1
    if not 1 <= args.concurrency <= prefetch_mod.MAX_CONCURRENCY or not 0 <= args.jitter <= 600:
        parser.error(f"--concurrency is 1..{prefetch_mod.MAX_CONCURRENCY}, --jitter 0..600")
    try:
        config = config_mod.load(args.config)
        if not config.host_cache:
            print("kmskeys-resolver prefetch: host_cache is off in the config", file=sys.stderr)
            return 1
        outcomes = prefetch_mod.prefetch(config, args.names, args.concurrency, args.jitter)
    except (ResolverError, OSError) as exc:
        print(f"kmskeys-resolver prefetch: {exc}", file=sys.stderr)
        return 1
    for name, outcome in outcomes:
        print(f"{name}: {outcome}")
    return 1 if any(outcome.startswith("failed") for _, outcome in outcomes) else 0


def _refresh(argv: Sequence[str]) -> int:
    import argparse
    import signal
    import threading

    from resolver import config as config_mod
    from resolver import refresh as refresh_mod
    from resolver.errors import ResolverError
    from resolver.log import field

    parser = argparse.ArgumentParser(
        prog="kmskeys-resolver refresh",
        description="Renew the keys the resolver answered, in place, before they expire (root).",
    )
    parser.add_argument("--config", type=Path, default=config_mod.DEFAULT_PATH)
    parser.add_argument("--once", action="store_true", help="renew every recorded key now, exit")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("kmskeys-resolver refresh: must run as root", file=sys.stderr)
        return 1
    try:
        config = config_mod.load(args.config)
        if not config.refresh_ahead:
            print("kmskeys-resolver refresh: refresh_ahead is off in the config", file=sys.stderr)
            return 1
        if args.once:
            for record, what in refresh_mod.once(config):
                print(f"{record.serial} {field(record.description)} uid {record.uid}: {what}")
            return 0
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        refresh_mod.run(config, stop)
    except (ResolverError, OSError) as exc:
        print(f"kmskeys-resolver refresh: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kmskeys-resolver` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "handle":
        # Imported lazily: `install` and `firewall` never pay for the handler's imports. The
        # handler runs in a supervised worker, so that even its SIGKILL gets the key answered.
        from resolver.supervise import supervise

        code = supervise(rest)
        # The kernel holds the requester that started the upcall until request-key and this
        # handler exit (UMH_WAIT_PROC), so skip interpreter teardown: the answer is given.
        sys.stderr.flush()
        os._exit(code)
    if command in ("install", "uninstall"):
        return _install_command(command, rest)
    if command == "serve":
        return _serve(rest)
    if command == "check":
        from resolver.selfcheck import main as check_main

        return check_main(rest)
    if command == "prefetch":
        return _prefetch(rest)
    if command == "refresh":
        return _refresh(rest)
    if command == "stored":
        from resolver.stored_cli import main as stored_main

        return stored_main(rest)
    if command == "firewall":
        from resolver.firewall.cli import main as firewall_main

        return firewall_main(rest)
    print(f"kmskeys-resolver: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2
