"""What `kmskeys exec` runs and where each secret goes: shared by the one-shot exec and --watch.

The mapping holds names of secrets, never their values, so argv, mapping files and error text
carry no secret. The error classes here are the ones kmskeys.cli maps to exit codes (docs/cli.md).
"""

from __future__ import annotations

from collections.abc import Mapping as MappingABC

from kmskeys.contract import DEFAULT_PREFIX
from kmskeys.secretref import described

_VAR_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_VAR_CHARS = _VAR_START | frozenset("0123456789")
_FILE_CHARS = _VAR_CHARS | frozenset(".@+-")


class UsageError(ValueError):
    """The command line or the mapping file is wrong; see `kmskeys exec --help`."""


class CommandNotFoundError(OSError):
    """COMMAND is not an executable file, here or on $PATH; check the name and $PATH."""


class CannotRunError(OSError):
    """execve(2) refused COMMAND (not a valid executable, or no permission); nothing ran."""


class SecretFailedError(Exception):
    """A secret could not be had: the first in the order asked for, and how many more failed."""

    def __init__(self, name: str, exc: BaseException, *, more: int = 0, note: str = "") -> None:
        tail = f" (and {more} more)" if more else ""
        super().__init__(f"secret {name!r}: {exc}{tail}{note}")
        self.cause = exc


class Mapping:
    """Where each secret goes: environment variables and file names, each to a secret name.

    A name is NAME, NAME#SELECTOR or a whole description (`DB=sm:prod/db#password`), checked
    against the grammar of its prefix (`prefix`, the --prefix, unless it names its own).
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.env: dict[str, str] = {}
        self.files: dict[str, str] = {}

    def add_env(self, item: str, where: str, *, quote: bool = True) -> None:
        """Map VAR=NAME; `quote=False` keeps the item's text out of error messages."""
        var, name = _split(item, where, self.prefix, quote=quote)
        if not (var[:1] in _VAR_START and set(var) <= _VAR_CHARS):
            shown = f"{var!r} is" if quote else "the part before '=' is"
            raise UsageError(f"{where}: {shown} not an environment variable name")
        if var in self.env:
            raise UsageError(f"{where}: {var} is given twice")
        self.env[var] = name

    def add_file(self, item: str, where: str) -> None:
        """Map FILE=NAME: FILE is one path segment below $CREDENTIALS_DIRECTORY."""
        file, name = _split(item, where, self.prefix)
        # One path segment, as a systemd credential name: no "/", not "." or "..". A leading
        # "." is refused too, which keeps the watch's in-flight files (kmskeys/credfs.py) apart.
        if not (file and file[0] != "." and set(file) <= _FILE_CHARS and len(file) <= 255):
            raise UsageError(f"{where}: {file!r} is not a credential file name")
        if file in self.files:
            raise UsageError(f"{where}: {file} is given twice")
        self.files[file] = name

    def names(self) -> list[str]:
        """Each secret name once, in the order first asked for."""
        return list(dict.fromkeys([*self.env.values(), *self.files.values()]))

    def files_of(self, name: str) -> list[str]:
        """The credential files that hold secret `name`."""
        return [file for file, mapped in self.files.items() if mapped == name]


def _split(item: str, where: str, prefix: str, *, quote: bool = True) -> tuple[str, str]:
    target, eq, name = item.partition("=")
    target, name = target.strip(), name.strip()
    if not eq or not target or not name:
        got = f", got {item!r}" if quote else ""
        raise UsageError(f"{where}: expected TARGET=NAME{got}")
    try:
        described(name, prefix)
    except ValueError:
        if quote:
            raise
        # A mapping file line that fails may hold a value put there by mistake: never echo it.
        raise UsageError(
            f"{where}: the part after '=' is not a valid secret name (a mapping holds names "
            "of secrets, never their values)"
        ) from None
    return target, name


def child_env(
    base: MappingABC[bytes, bytes],
    mapping: Mapping,
    secrets: MappingABC[str, bytes],
    credentials_dir: str | None,
) -> dict[bytes, bytes]:
    """The command's environment: `base`, each --env secret, and $CREDENTIALS_DIRECTORY."""
    env = dict(base)
    for var, name in mapping.env.items():
        if b"\0" in secrets[name]:
            raise UsageError(
                f"secret {name!r} holds a NUL byte, which no environment variable can: "
                f"use --file instead of --env for {var}"
            )
        env[var.encode()] = secrets[name]
    if credentials_dir is not None:
        env[b"CREDENTIALS_DIRECTORY"] = credentials_dir.encode()
    return env


class SecretWithdrawnError(SecretFailedError):
    """`exec --watch`: the resolver refused a secret the command had (or no longer knows it), so
    the command was stopped; the resolver log says why."""


class Plan:
    """What to run: the command, its executable, the mapping, and how secrets are asked for."""

    def __init__(
        self,
        command: list[str],
        executable: str,
        mapping: Mapping,
        prefix: str,
        keyring: str | None,
    ) -> None:
        self.command = command
        self.executable = executable
        self.mapping = mapping
        self.prefix = prefix
        self.keyring = keyring
