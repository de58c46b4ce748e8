"""The `kmskeys` front door: get, show, flush, exec here; doctor and the build side on demand.

`kmskeys get` runs in short-lived processes (cron, CGI, shell scripts): its budget is a bare
`python -c pass` + 3 ms (docs/design.md). So this module imports nothing at the top that the
interpreter has not already loaded for itself, bar kmskeys' own client: argparse, pathlib, enum
and re (argparse imports the last three) cost milliseconds, and only the other subcommands, or a
`get` with options beyond the plain ones (`_get_plain`), load argparse. Nothing here imports
boto3 or walks entry points unless a subcommand that needs it is asked for.
"""

from __future__ import annotations

import errno
import os
import sys

from kmskeys import KEYRINGS, keyutils
from kmskeys.contract import DEFAULT_PREFIX

TYPE_CHECKING = False  # not `from typing import`: typing costs milliseconds to import

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator, Sequence

    from kmskeys.hostflush import Flushed
    from kmskeys.prockeys import ProcKey

# Exit codes of `kmskeys get` and `kmskeys flush`, one per error class (docs/cli.md).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_UNAVAILABLE = 5
EXIT_QUOTA = 6
EXIT_PERMISSION = 7
EXIT_STALE = 8
EXIT_FOREIGN = 9
# `protect` / `unprotect`, one per DPAPI error class (docs/dpapi.md).
EXIT_NOT_A_BLOB = 10
EXIT_WRONG_USER = 11
EXIT_NOT_AUTHENTIC = 12
EXIT_UNKNOWN_VERSION = 13
EXIT_SCOPE_POLICY = 14
# `exec`: the command did not run, as env(1) and the shells say it.
EXIT_CANNOT_RUN = 126
EXIT_COMMAND_NOT_FOUND = 127

COMMAND_GROUP = "kmskeys.commands"

USAGE = """\
usage: kmskeys COMMAND [ARGS...]

host commands (NAME may be a whole description: sm:prod/db#password, ssm:app/db):
  get NAME       print the secret NAME (from the kernel cache, or resolved once)
  show           list the kms keys this process can see, with expiry (never payloads)
  flush NAME     invalidate the cached key NAME so the next request re-resolves it
                 (as root: every uid's copy and the host cache; --all: every key under
                 the prefix; --everything: every key kmskeys made, under every prefix)
  exec -- CMD    run CMD with secrets in its environment or in private files:
                 exec [--env VAR=NAME] [--env-file MAP] [--file FILE=NAME] -- CMD [ARGS]
                 (--watch: stay as CMD's parent and bring it each rotated secret)
  doctor         check this host's kmskeys set-up and explain each finding

DPAPI on this host's stored: keys (pip install 'kmskeys[dpapi]'):
  protect        protect stdin to stdout under your (or the host's) master key
  unprotect      unprotect stdin to stdout

build-side commands (pip install 'kmskeys[encrypt]'):
  encrypt NAME   encrypt stdin into a blob bound to NAME
  inspect BLOB   describe a blob without decrypting it
  bundle ENVFILE encrypt every KEY=VALUE of an env file into DIR/NAME.kms
  create-key     make a KMS key and its alias (a test KMS off EC2), print its ARN

Run `kmskeys COMMAND --help` for a command's options.
"""


def _exit_code(exc: BaseException) -> int:
    from kmskeys import errors

    table: tuple[tuple[type[BaseException], int], ...] = (
        (errors.NotAProtectBlobError, EXIT_NOT_A_BLOB),
        (errors.WrongUserError, EXIT_WRONG_USER),
        (errors.ProtectAuthenticationError, EXIT_NOT_AUTHENTIC),
        (errors.UnknownKeyVersionError, EXIT_UNKNOWN_VERSION),
        (errors.ScopeNotAllowedError, EXIT_SCOPE_POLICY),
        (errors.InvalidNameError, EXIT_USAGE),
        (errors.KeyNotFoundError, EXIT_NOT_FOUND),
        (errors.KeyRejectedError, EXIT_REFUSED),
        (errors.TemporarilyUnavailableError, EXIT_UNAVAILABLE),
        (errors.QuotaExceededError, EXIT_QUOTA),
        (errors.KeyOwnershipError, EXIT_FOREIGN),
        (PermissionError, EXIT_PERMISSION),
        (errors.KeyExpiredError, EXIT_STALE),
        (errors.KeyRevokedError, EXIT_STALE),
    )
    return next((code for cls, code in table if isinstance(exc, cls)), EXIT_ERROR)


def _fail(prog: str, exc: BaseException) -> int:
    print(f"{prog}: {exc}", file=sys.stderr)
    return _exit_code(exc)


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help="description namespace the resolver serves (default: %(default)s)",
    )
    return parser


def cmd_get(argv: Sequence[str]) -> int:
    """`kmskeys get NAME [--blob BLOB | --blob-file FILE]`: write the secret to stdout."""
    parser = _parser("kmskeys get", "Print the secret NAME to stdout, resolving it if needed.")
    parser.add_argument(
        "name",
        metavar="NAME",
        help="a secret name, NAME#SELECTOR, or a whole description (sm:prod/db#password)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--blob", help="the blob itself (ciphertext, safe in argv)")
    source.add_argument("--blob-file", type=_path, help="read the blob from FILE ('-' for stdin)")
    parser.add_argument(
        "--keyring",
        choices=KEYRINGS,
        help="cache in this keyring: session, or user/persistent to share across this uid's "
        "sessions (default: this process's session keyring)",
    )
    args = parser.parse_args(argv)
    return _get(args.name, args.blob, args.blob_file, args.prefix, args.keyring)


def _path(value: str) -> str:
    from pathlib import Path

    return str(Path(value))  # as argparse's type=Path gave it: "a//b/" is "a/b", "" is "."


def _get(
    name: str, blob: str | None, blob_file: str | None, prefix: str, keyring: str | None
) -> int:
    from kmskeys import get_secret

    try:
        callout: str | bytes | None = blob
        if blob_file is not None:
            callout = _read_blob_file(blob_file)
        secret = get_secret(name, callout, prefix=prefix, keyring=keyring)
    except Exception as exc:  # every error: one line, one exit code
        return _fail("kmskeys get", exc)
    from kmskeys.secretout import written

    return EXIT_OK if written(secret, "kmskeys get") else EXIT_ERROR


def _read_blob_file(path: str) -> bytes:
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(path, "rb") as file:
            data = file.read()
    return data.strip()


_GET_OPTIONS = ("--prefix", "--blob", "--blob-file", "--keyring")


def _get_plain(argv: Sequence[str]) -> int | None:
    """`get` without argparse, for the argument lists that need nothing of it; None otherwise.

    Accepted: NAME once, and each of --prefix, --blob, --blob-file (not both blob options) and
    --keyring at most once, as `--opt VALUE` or `--opt=VALUE`, with a value that does not start
    with "-", and `--` before a NAME. Anything else (-h, abbreviations, repeats, bad choices,
    a missing value, a path argparse would normalise) goes to cmd_get, so argparse prints its
    own usage and errors: the output of `get` is the same either way.
    """
    name: str | None = None
    values: dict[str, str] = {}
    i, count = 0, len(argv)
    while i < count:
        arg = argv[i]
        i += 1
        if arg == "--":
            if name is not None or i != count - 1:
                return None
            name = argv[i]
            break
        if arg[:1] != "-":
            if name is not None:
                return None
            name = arg
            continue
        option, eq, value = arg.partition("=")
        if option not in _GET_OPTIONS or option in values:
            return None
        if not eq:
            if i == count:
                return None
            value = argv[i]
            i += 1
            if value[:1] == "-" and value != "-":
                return None
        values[option] = value
    blob, blob_file = values.get("--blob"), values.get("--blob-file")
    keyring = values.get("--keyring")
    if (
        name is None
        or (blob is not None and blob_file is not None)
        or (keyring is not None and keyring not in KEYRINGS)
        or (blob_file is not None and not _normal_path(blob_file))
    ):
        return None
    return _get(name, blob, blob_file, values.get("--prefix", DEFAULT_PREFIX), keyring)


def _normal_path(path: str) -> bool:
    # str(pathlib.Path(p)) == p: no empty or "." segment below an optional leading "/".
    return path == "-" or all(part not in ("", ".") for part in path.removeprefix("/").split("/"))


def visible_keys(prefix: str | None) -> Iterator[ProcKey]:
    """The live `user` keys under `prefix:` that /proc/keys lists for this process, each confirmed
    by keyctl_describe (kmskeys/prockeys.py); prefix None: every key the resolver made."""
    from kmskeys import prockeys
    from kmskeys.contract import RESOLVER_KEY_PERMS

    def wanted(key: ProcKey) -> bool:
        if key.type != "user":
            return False
        if prefix is None:
            # The masks the resolver gives the keys it answers (kmskeys/contract.py).
            return key.perm in RESOLVER_KEY_PERMS
        return key.description.startswith(prefix + ":")

    # Invalidated and dead keys linger in /proc/keys until the key GC runs; describe refuses
    # them, so they are never confirmed.
    found = prockeys.keys(wanted)
    yield from sorted(found.values(), key=lambda k: k.description)


def cmd_show(argv: Sequence[str]) -> int:
    """`kmskeys show`: the cached kms keys this process can see, with their expiry."""
    parser = _parser("kmskeys show", "List the kms keys this process can see (never payloads).")
    args = parser.parse_args(argv)
    try:
        keys = list(visible_keys(args.prefix))
    except OSError as exc:
        return _fail("kmskeys show", exc)
    if not keys:
        print(f"no {args.prefix}: keys visible to this process")
        return EXIT_OK
    rows = [("SERIAL", "NAME", "STATE", "EXPIRES", "UID", "BYTES")]
    rows += [
        (
            str(k.serial),
            k.description.partition(":")[2],
            k.state,
            _expiry(k.expiry),
            str(k.uid),
            "-" if k.size is None else str(k.size),
        )
        for k in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return EXIT_OK


def _expiry(field: str) -> str:
    return {"perm": "never", "expd": "expired"}.get(field, "in " + field)


def cmd_flush(argv: Sequence[str]) -> int:
    """`kmskeys flush NAME|--all|--everything`: invalidate every visible cached key for NAME and
    drop its cached failures; as root, every uid's copies and the host cache's entries as well
    (kmskeys.hostflush)."""
    parser = _parser(
        "kmskeys flush", "Invalidate the cached key NAME; the next request re-resolves."
    )
    parser.set_defaults(prefix=None)
    parser.add_argument("name", metavar="NAME", nargs="?")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--all", action="store_true", help="every cached key under the prefix, not one name"
    )
    scope.add_argument(
        "--everything",
        action="store_true",
        help="every key the resolver made, under every prefix (as root: every uid's, and the "
        "whole host cache)",
    )
    args = parser.parse_args(argv)
    if args.everything and (args.name is not None or args.prefix is not None):
        parser.error("--everything takes no NAME and no --prefix")
    if not args.everything and (args.name is None) != args.all:
        parser.error("give NAME, --all or --everything")
    prefix = None if args.everything else args.prefix or DEFAULT_PREFIX
    name = None if args.all or args.everything else args.name
    try:
        if prefix is None:
            label = "every kmskeys key"
        elif name is None:
            label = f"{prefix}:*"
        else:
            from kmskeys.secretref import described

            # NAME, NAME#SELECTOR or a whole description (`sm:prod/db`): its own prefix wins.
            label = described(name, prefix)
            prefix, _, name = label.partition(":")
        host = None
        if os.geteuid() == 0:
            from kmskeys.hostflush import flush_host

            host = flush_host(prefix, name)
        found = _flush_own(prefix, None if name is None else label)
    except Exception as exc:  # every error: one line, one exit code
        return _fail("kmskeys flush", exc)
    print(_flushed(label, host, found), file=sys.stdout if found or _any(host) else sys.stderr)
    return EXIT_OK


def _any(host: Flushed | None) -> bool:
    return host is not None and bool(host.keys or host.entries or host.negative)


def _flushed(label: str, host: Flushed | None, own: int) -> str:
    if _any(host):
        assert host is not None
        lingering = f" ({host.lingering} not yet collected)" if host.lingering else ""
        failures = f", {host.negative} cached failures" if host.negative else ""
        return (
            f"{label}: flushed {host.keys + own} cached keys of {host.uids} uids{failures} and "
            f"{host.entries} host-cache entries{lingering}"
        )
    if not own:
        return f"{label}: nothing cached"
    return f"{label}: flushed {own} cached key{'s' if own > 1 else ''}"


def _flush_own(prefix: str | None, desc: str | None) -> int:
    """Flush the keys this process sees under `prefix` (one description when given, with its
    selectors' keys: kmskeys.hostflush.covers)."""
    from kmskeys.hostflush import OWN_FLUSH_WAIT, covers, invalidate_each

    count = 0
    found = [k for k in visible_keys(prefix) if desc is None or covers(desc, k.description)]
    # Invalidation removes the key from every keyring, so no other process of this user keeps
    # serving the old value after a rotation.
    done = invalidate_each([key.serial for key in found], OWN_FLUSH_WAIT)
    for key in found:
        # False: a negative key cannot be invalidated (every lookup but unlink's returns its
        # rejection errno); unlinking it from our keyrings below drops it for us. None: a key
        # under construction (invalidation waits until it is answered): root's flush changed
        # the flush epoch first, so its answer resolves again (kmskeys/flushepoch.py).
        flushed = bool(done[key.serial])
        # Until the key GC runs, a search still meets the invalidated key and request_key
        # answers EKEYREVOKED without an upcall; unlinking it from our own keyrings now makes
        # the very next request miss and ask the resolver.
        if _unlink_from_own_keyrings(key.serial) or flushed:
            count += 1
    return count


def _unlink_from_own_keyrings(serial: int) -> bool:
    # Unlink is the one keyctl whose lookup skips validation, so it works on negative and
    # invalidated keys alike; True if any of this process's keyrings held the key.
    from kmskeys.errors import KeyctlError

    unlinked = False
    for ring in (
        keyutils.KEY_SPEC_THREAD_KEYRING,
        keyutils.KEY_SPEC_PROCESS_KEYRING,
        keyutils.KEY_SPEC_SESSION_KEYRING,
        keyutils.KEY_SPEC_USER_KEYRING,
        keyutils.KEY_SPEC_USER_SESSION_KEYRING,
    ):
        try:
            keyutils.keyctl_unlink(serial, ring)
            unlinked = True
        except KeyctlError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOKEY):
                raise
    return unlinked


def _doctor(argv: Sequence[str]) -> int:
    from kmskeys.doctor import main as doctor_main

    code: int = doctor_main(list(argv))
    return code


def _exec(argv: Sequence[str]) -> int:
    from kmskeys import exec_cli

    prog = "kmskeys exec"
    try:
        return exec_cli.main(argv)  # on success, the command has replaced this process
    except exec_cli.UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except exec_cli.CommandNotFoundError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_COMMAND_NOT_FOUND
    except exec_cli.CannotRunError as exc:
        print(f"{prog}: {exc.strerror}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except exec_cli.SecretFailedError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return _exit_code(exc.cause)
    except Exception as exc:  # every error: one line, one exit code
        return _fail(prog, exc)


def _dpapi(command: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        try:
            from kmskeys import dpapi_cli

            main = dpapi_cli.protect_main if command == "protect" else dpapi_cli.unprotect_main
            return main(argv)
        except ImportError as exc:
            print(
                f"kmskeys {command}: not available ({exc.name or exc}); "
                "install it with: pip install 'kmskeys[dpapi]'",
                file=sys.stderr,
            )
            return EXIT_ERROR
        except Exception as exc:  # every error: one line, one exit code
            return _fail(f"kmskeys {command}", exc)

    return run


BUILTINS: dict[str, Callable[[Sequence[str]], int]] = {
    "get": cmd_get,
    "show": cmd_show,
    "flush": cmd_flush,
    "doctor": _doctor,
    "exec": _exec,
    "protect": _dpapi("protect"),
    "unprotect": _dpapi("unprotect"),
}


def _plugin(name: str) -> Callable[[list[str]], int] | None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=COMMAND_GROUP, name=name):
        command: Callable[[list[str]], int] = entry.load()
        return command
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kmskeys` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return EXIT_OK if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    if command == "get":
        code = _get_plain(rest)
        if code is not None:
            return code
    if command in BUILTINS:
        return BUILTINS[command](rest)
    try:
        plugin = _plugin(command)
    except ImportError as exc:
        print(
            f"kmskeys {command}: not available ({exc.name or exc}); "
            "install the build side with: pip install 'kmskeys[encrypt]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    if plugin is None:
        print(f"kmskeys: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
        return EXIT_USAGE
    return plugin(rest)


if __name__ == "__main__":
    sys.exit(main())
