"""The report of `kmskeys-resolver check`: one declared shape for its writer and its reader.

`kmskeys doctor` may not import the resolver (the import contracts keep the client apart), and
the resolver that matters is the one the installed rule runs, possibly in another environment;
so the resolver prints this report as one JSON object (resolver/selfcheck.py) and doctor reads
it (kmskeys/doctor/). Both sides are typed with these declarations, and `parse_report` refuses
an object that does not have the shape, so a drift between them is a finding, not a KeyError.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict, TypeGuard

# Why the resolver could not load its config, or a file or directory it refuses, as one word
# doctor maps to a fix: kmskeys.fileio's refusal words (missing, symlink, unsafe, unreadable,
# not-regular, ...) or "invalid" for a config that reads but does not validate.
ConfigProblemKind = str
# What the handler would refuse about an entry of blob_dir: fileio's words, or bad-name,
# refused, unparseable, misnamed, expired, key, unsafe-dir.
BlobProblemKind = str


class ConfigLoaded(TypedDict):
    """The config as the resolver loaded it: the settings doctor's checks look at."""

    ok: Literal[True]
    prefix: str
    stored_prefix: str
    # The AWS sources' prefixes (sm:, ssm:) and how many allowlist entries each has (0: none).
    sources: dict[str, int]
    blob_dir: str
    allow_legacy_blobs: bool
    syslog_socket: str
    warm_socket: str | None
    key_arns: list[str]
    discovery: bool
    # What kmskeys-gate must be given on the rule line (install writes it from the config).
    gate_settings: list[str]
    # Keys the file sets that mean nothing any more, with what to do about each.
    obsolete: dict[str, str]
    # The per-name rules that bind names to programs: table, glob and their allow_units,
    # allow_cgroups, allow_exe (resolver/selfcheck.py program_policies).
    program_policies: list[dict[str, Any]]
    # What the other backends need on this host (a report of an older resolver lacks them):
    # whether refresh-ahead records keys, and whether a refresher runs; the pass: and token:
    # prefixes with the gpg program and the PKCS#11 module they run (and whether each is
    # there); the keystore's flat-layout leftovers (None: not readable here).
    refresh_ahead: NotRequired[bool]
    refresher: NotRequired[bool | None]  # a refresh loop holds its lock (None: cannot tell)
    refresh_records: NotRequired[int | None]  # answered keys recorded for it (None: unknown)
    pass_prefix: NotRequired[str]
    token_prefix: NotRequired[str]
    tools: NotRequired[dict[str, ToolFound]]
    keystore: NotRequired[KeystoreFound]


class ToolFound(TypedDict):
    """A program or library a backend runs: its path, and whether it is there to run."""

    path: str | None
    ok: bool


class KeystoreFound(TypedDict):
    """The keystore: its directory, and entries left in the flat layout of kmskeys 0.1."""

    dir: str
    flat: int | None


class ConfigRefused(TypedDict):
    """The config could not be loaded: why, where, and the key at fault if one is."""

    ok: Literal[False]
    problem: ConfigProblemKind
    path: str
    error: str
    key: str | None


class BlobFinding(TypedDict, total=False):
    """What the handler would refuse about one entry of blob_dir (`key_arn` for a key the config
    lacks)."""

    problem: BlobProblemKind
    error: str
    key_arn: str | None


class BlobProblem(BlobFinding, total=False):
    """A BlobFinding with the entry's path."""

    path: str


class _BlobsMissingBase(TypedDict):
    problem: str  # missing, unsafe, unreadable


class BlobsMissing(_BlobsMissingBase, total=False):
    """blob_dir is missing, unsafe or unreadable (`error` says how, except when missing)."""

    error: str


class BlobsScanned(TypedDict):
    """blob_dir was read: how many blob files, whether the scan stopped early, what is wrong."""

    problem: None
    files: int
    truncated: bool
    problems: list[BlobProblem]


class _GateBase(TypedDict):
    ok: bool
    problem: str | None  # missing, stale
    expected: str  # this resolver's build stamp (kmskeys/contract.h)


class GateReport(_GateBase, total=False):
    """The installed kmskeys-gate's build stamp against the resolver's."""

    path: str
    stamp: str
    error: str


class CheckReport(TypedDict):
    """The whole verdict for one config."""

    config_path: str
    resolver: str  # the program that answered (argv[0])
    python: str  # its interpreter
    config: ConfigLoaded | ConfigRefused
    known_keys: list[str]
    dependencies: str | None  # the first missing dependency of a miss, with how to install it
    gate: GateReport
    blobs: BlobsMissing | BlobsScanned | None


_TOP = {
    "config_path": str,
    "resolver": str,
    "python": str,
    "config": dict,
    "known_keys": list,
    "gate": dict,
}


def parse_report(value: object) -> CheckReport | None:
    """`value` (decoded JSON) as a CheckReport, or None when it does not have the shape."""
    return value if _is_report(value) else None


def _is_report(value: object) -> TypeGuard[CheckReport]:
    if not isinstance(value, dict):
        return False
    if any(not isinstance(value.get(key), kind) for key, kind in _TOP.items()):
        return False
    config = value["config"]
    if config.get("ok") is True:
        wanted = ConfigLoaded.__required_keys__
    elif config.get("ok") is False:
        wanted = ConfigRefused.__required_keys__
    else:
        return False
    if not wanted <= config.keys():
        return False
    blobs = value.get("blobs")
    if blobs is not None and not (isinstance(blobs, dict) and "problem" in blobs):
        return False
    dependencies = value.get("dependencies")
    return dependencies is None or isinstance(dependencies, str)


def loaded_config(report: CheckReport) -> ConfigLoaded | None:
    """The report's config when the resolver could load it."""
    config = report["config"]
    return config if config["ok"] is True else None


def refused_config(report: CheckReport) -> ConfigRefused | None:
    """Why the resolver could not load its config, when it could not."""
    config = report["config"]
    return config if config["ok"] is False else None
