"""`kmskeys exec`: run a command with secrets in its environment or in private files.

    kmskeys exec [--prefix P] [--keyring K] [--env VAR=NAME]... [--env-file MAPPING]...
                 [--file FILE=NAME]... [--watch [WATCH OPTIONS]] -- COMMAND [ARGS...]

Every secret is resolved first, concurrently, through the kernel cache (get_secret: a thread
each, the hit and the upcall wait both release the GIL). Only when all of them are in hand is
COMMAND started, by execve(2) in this very process: no shell, no wrapper left running, nothing
written to disk. Any failure stops before the exec with one line on stderr and the exit code of
its error class (docs/cli.md). The mapping holds names, never values: argv and error text carry
no secret. `--file` puts a secret in a filesystem only the command can reach (kmskeys/credfs.py)
and sets $CREDENTIALS_DIRECTORY as systemd does; docs/cli.md says why it is the one to prefer.
With --watch, COMMAND is started as a child instead and this process stays to bring it each
rotated secret (kmskeys/exec_watch.py, imported only then).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from kmskeys import KEYRINGS, get_secret
from kmskeys.contract import DEFAULT_PREFIX
from kmskeys.exec_plan import (
    CannotRunError,
    CommandNotFoundError,
    Mapping,
    Plan,
    SecretFailedError,
    UsageError,
    child_env,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kmskeys.exec_watch import WatchOptions

PROG = "kmskeys exec"
# Misses in flight at once. The resolver's gate refuses (EAGAIN at once) past
# max_concurrent_per_uid concurrent misses of a uid (4 by default; docs/resolver.md), which the
# uid's other processes may be using too, so more could fail a cold start; hits take
# microseconds each, so they lose nothing by waiting.
MAX_THREADS = 2
# --watch settings: (default, lowest, highest) seconds; docs/cli.md says why each default.
WATCH_SECONDS = {
    "interval": (2.0, 0.1, 3600.0),
    "holdoff": (10.0, 1.0, 86400.0),
    "stop_timeout": (10.0, 0.1, 3600.0),
}
ON_REVOKE = ("stop", "keep")
__all__ = [
    "CannotRunError",
    "CommandNotFoundError",
    "Mapping",
    "SecretFailedError",
    "UsageError",
    "main",
]


def _read_env_file(path: str, mapping: Mapping) -> None:
    # `VAR=NAME` lines; blank lines and `#` comments are skipped. The file names secrets and
    # holds none, so it may be as readable as the unit file that points to it.
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                text = line.strip()
                if text and not text.startswith("#"):
                    mapping.add_env(text, f"{path}:{number}", quote=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--env-file {path}: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [OPTIONS] -- COMMAND [ARGS...]",
        description="Run COMMAND with secrets in its environment (--env) or in files only it "
        "can read (--file, recommended). All secrets are resolved before COMMAND starts; if "
        "any fails, COMMAND does not run.",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="default: %(default)s")
    parser.add_argument("--keyring", choices=KEYRINGS, help="as for `kmskeys get`")
    parser.add_argument(
        "--env", action="append", default=[], metavar="VAR=NAME", help="set $VAR to secret NAME"
    )
    parser.add_argument(
        "--env-file",
        action="append",
        default=[],
        metavar="MAPPING",
        help="VAR=NAME lines (names of secrets, never values; # comments)",
    )
    parser.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="FILE=NAME",
        help="write secret NAME to $CREDENTIALS_DIRECTORY/FILE, mode 0400, in a filesystem "
        "only COMMAND can reach",
    )
    watch = parser.add_argument_group(
        "watch mode", "stay as COMMAND's parent and bring it each rotated secret (docs/cli.md)"
    )
    watch.add_argument("--watch", action="store_true", help="watch the secrets COMMAND was given")
    watch.add_argument(
        "--on-change",
        metavar="ACTION",
        help="restart (default), signal:SIG (e.g. signal:HUP; --file only) or exec:CMD "
        "(--file only)",
    )
    for option, (default, low, high) in WATCH_SECONDS.items():
        watch.add_argument(
            "--" + option.replace("_", "-"),
            metavar="SECONDS",
            help=f"{_WATCH_HELP[option]} (default {default:g}, {low:g} to {high:g})",
        )
    watch.add_argument(
        "--on-revoke",
        choices=ON_REVOKE,
        help="a refused or unknown secret: stop COMMAND (default) or keep it running",
    )
    return parser


_WATCH_HELP = {
    "interval": "how often the kernel keys are checked",
    "holdoff": "at least this long between two actions",
    "stop_timeout": "SIGKILL a stopped COMMAND after this long",
}


def _watch_options(opts: argparse.Namespace, mapping: Mapping) -> WatchOptions | None:
    """The --watch settings, checked before any secret is resolved; None without --watch."""
    given = [name for name in ("on_change", *WATCH_SECONDS, "on_revoke") if getattr(opts, name)]
    if not opts.watch:
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --watch")
        return None
    from kmskeys.exec_watch import OnChange, WatchOptions

    on_change = OnChange.parse(opts.on_change or "restart")
    if on_change.kind != "restart" and mapping.env:
        raise UsageError(
            f"--on-change={opts.on_change}: a new --env value reaches COMMAND only by a "
            "restart; use --on-change=restart, or --file for these secrets"
        )
    if on_change.kind == "exec":
        found = _find(on_change.argv[0], os.environ.get("PATH", os.defpath))
        on_change = replace(on_change, executable=found)
    seconds = {
        name: _seconds(name, getattr(opts, name), *bounds) for name, bounds in WATCH_SECONDS.items()
    }
    return WatchOptions(on_change, on_revoke=opts.on_revoke or ON_REVOKE[0], **seconds)


def _seconds(name: str, text: str | None, default: float, low: float, high: float) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:  # NaN fails too
        option = "--" + name.replace("_", "-")
        raise UsageError(f"{option} {text}: expected seconds from {low:g} to {high:g}")
    return value


def _find(command: str, path: str | None) -> str:
    # A path is execve's to judge (CannotRunError); a bare name is looked up on $PATH first, so
    # that a typo costs no secret resolution.
    found = command if "/" in command else shutil.which(command, path=path)
    if found is None:
        raise CommandNotFoundError(f"{command}: command not found")
    return found


def _resolve(names: Sequence[str], prefix: str, keyring: str | None) -> dict[str, bytes]:
    def one(name: str) -> bytes:
        return get_secret(name, prefix=prefix, keyring=keyring)

    with ThreadPoolExecutor(max_workers=min(MAX_THREADS, len(names))) as pool:
        futures = {name: pool.submit(one, name) for name in names}
    failures = [(name, exc) for name, f in futures.items() if (exc := f.exception())]
    if failures:
        raise SecretFailedError(*failures[0], more=len(failures) - 1)
    return {name: f.result() for name, f in futures.items()}


def _mapping(opts: argparse.Namespace) -> Mapping:
    mapping = Mapping(opts.prefix)
    for item in opts.env:
        mapping.add_env(item, f"--env {item}")
    for path in opts.env_file:
        _read_env_file(path, mapping)
    for item in opts.file:
        mapping.add_file(item, f"--file {item}")
    if not mapping.names():
        raise UsageError("no --env, --env-file or --file: nothing to inject")
    return mapping


def main(argv: Sequence[str]) -> int:
    """Run COMMAND in place of this process, or raise (kmskeys.cli prints the one line).

    Returns only for --help, and with --watch, COMMAND's exit status. UsageError,
    CommandNotFoundError, SecretFailedError and CannotRunError say what stopped it; kmskeys.cli
    maps each to its exit code.
    """
    args = list(argv)
    if "--" not in args:
        if any(a in ("-h", "--help") for a in args):
            _parser().print_help()
            return 0
        raise UsageError(f"put -- before the command (see {PROG} --help)")
    split = args.index("--")
    opts, command = _parser().parse_args(args[:split]), args[split + 1 :]
    if not command:
        raise UsageError("no command after --")
    mapping = _mapping(opts)
    watching = _watch_options(opts, mapping)
    executable = _find(command[0], os.environ.get("PATH", os.defpath))
    # The filesystem first: its helper forks, which is safest before any thread exists.
    root = None
    if mapping.files:
        from kmskeys import credfs

        root = credfs.private_fs()
    secrets = _resolve(mapping.names(), opts.prefix, opts.keyring)
    if watching is not None:
        from kmskeys import exec_watch

        plan = Plan(command, executable, mapping, opts.prefix, opts.keyring)
        return exec_watch.run(plan, watching, secrets, root)
    env = child_env(os.environb, mapping, secrets, None)
    if root is not None:
        for file, name in mapping.files.items():
            credfs.write_file(root, file, secrets[name])
        env[b"CREDENTIALS_DIRECTORY"] = credfs.seal(root).encode()
        os.set_inheritable(root, True)
    del secrets
    # Python ignores SIGPIPE and SIGXFSZ for itself; the command gets the default dispositions,
    # as it would from a shell.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(executable, command, env)  # noqa: S606 - no shell, by design
    except OSError as exc:
        raise CannotRunError(exc.errno, f"{command[0]}: {exc.strerror}") from None
    raise AssertionError("unreachable: execve returned")
