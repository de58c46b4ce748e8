"""`kmskeys exec`: run a command with secrets in its environment or in private files.

    kmskeys exec [--prefix P] [--keyring K] [--env VAR=NAME]... [--env-file MAPPING]...
                 [--file FILE=NAME]... -- COMMAND [ARGS...]

Every secret is resolved first, concurrently, through the kernel cache (get_secret: a thread
each, the hit and the upcall wait both release the GIL). Only when all of them are in hand is
COMMAND started, by execve(2) in this very process: no shell, no wrapper left running, nothing
written to disk. Any failure stops before the exec with one line on stderr and the exit code of
its error class (docs/cli.md). The mapping holds names, never values: argv and error text carry
no secret. `--file` puts a secret in a filesystem only the command can reach (kmskeys/credfs.py)
and sets $CREDENTIALS_DIRECTORY as systemd does; docs/cli.md says why it is the one to prefer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from kmskeys.contract import DEFAULT_PREFIX
from kmskeys.key import KEYRINGS, get_secret
from kmskeys.names import validate_name

PROG = "kmskeys exec"
# Misses in flight at once. The resolver's gate refuses (EAGAIN at once) past
# max_concurrent_per_uid concurrent misses of a uid (4 by default; docs/resolver.md), which the
# uid's other processes may be using too, so more could fail a cold start; hits take
# microseconds each, so they lose nothing by waiting.
MAX_THREADS = 2
_VAR_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_VAR_CHARS = _VAR_START | frozenset("0123456789")
_FILE_CHARS = _VAR_CHARS | frozenset(".@+-")


class UsageError(ValueError):
    """The command line or the mapping file is wrong; see `kmskeys exec --help`."""


class CommandNotFoundError(OSError):
    """COMMAND is not an executable file, here or on $PATH; check the name and $PATH."""


class CannotRunError(OSError):
    """execve(2) refused COMMAND (not a valid executable, or no permission); nothing ran."""


class Mapping:
    """Where each secret goes: environment variables and file names, each to a secret name."""

    def __init__(self) -> None:
        self.env: dict[str, str] = {}
        self.files: dict[str, str] = {}

    def add_env(self, item: str, where: str, *, quote: bool = True) -> None:
        """Map VAR=NAME; `quote=False` keeps the item's text out of error messages."""
        var, name = _split(item, where, quote=quote)
        if not (var[:1] in _VAR_START and set(var) <= _VAR_CHARS):
            shown = f"{var!r} is" if quote else "the part before '=' is"
            raise UsageError(f"{where}: {shown} not an environment variable name")
        if var in self.env:
            raise UsageError(f"{where}: {var} is given twice")
        self.env[var] = name

    def add_file(self, item: str, where: str) -> None:
        file, name = _split(item, where)
        # One path segment, as a systemd credential name: no "/", not "." or "..".
        if not (file and file[0] != "." and set(file) <= _FILE_CHARS and len(file) <= 255):
            raise UsageError(f"{where}: {file!r} is not a credential file name")
        if file in self.files:
            raise UsageError(f"{where}: {file} is given twice")
        self.files[file] = name

    def names(self) -> list[str]:
        """Each secret name once, in the order first asked for."""
        return list(dict.fromkeys([*self.env.values(), *self.files.values()]))


def _split(item: str, where: str, *, quote: bool = True) -> tuple[str, str]:
    target, eq, name = item.partition("=")
    target, name = target.strip(), name.strip()
    if not eq or not target or not name:
        got = f", got {item!r}" if quote else ""
        raise UsageError(f"{where}: expected TARGET=NAME{got}")
    try:
        validate_name(name)
    except ValueError:
        if quote:
            raise
        # A mapping file line that fails may hold a value put there by mistake: never echo it.
        raise UsageError(
            f"{where}: the part after '=' is not a valid secret name (a mapping holds names "
            "of secrets, never their values)"
        ) from None
    return target, name


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
    return parser


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


class SecretFailedError(Exception):
    """A secret could not be had: the first in the order asked for, and how many more failed."""

    def __init__(self, name: str, exc: BaseException, *, more: int) -> None:
        tail = f" (and {more} more)" if more else ""
        super().__init__(f"secret {name!r}: {exc}{tail}")
        self.cause = exc


def main(argv: Sequence[str]) -> int:
    """Run COMMAND in place of this process, or raise (kmskeys.cli prints the one line).

    Returns only for --help. UsageError, CommandNotFoundError, SecretFailedError and
    CannotRunError say what stopped it; kmskeys.cli maps each to its exit code.
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
    mapping = Mapping()
    for item in opts.env:
        mapping.add_env(item, f"--env {item}")
    for path in opts.env_file:
        _read_env_file(path, mapping)
    for item in opts.file:
        mapping.add_file(item, f"--file {item}")
    if not mapping.names():
        raise UsageError("no --env, --env-file or --file: nothing to inject")
    executable = _find(command[0], os.environ.get("PATH", os.defpath))
    # The filesystem first: its helper forks, which is safest before any thread exists.
    root = None
    if mapping.files:
        from kmskeys import credfs

        root = credfs.private_fs()
    secrets = _resolve(mapping.names(), opts.prefix, opts.keyring)
    env = dict(os.environb)
    for var, name in mapping.env.items():
        if b"\0" in secrets[name]:
            raise UsageError(
                f"secret {name!r} holds a NUL byte, which no environment variable can: "
                f"use --file instead of --env for {var}"
            )
        env[var.encode()] = secrets[name]
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
