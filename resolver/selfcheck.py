"""`kmskeys-resolver check`: the resolver's own verdict on its config, dependencies and blobs.

`kmskeys doctor` may not import the resolver (the import contracts keep the client apart), and
the resolver that matters is the one the installed rule runs, possibly in another environment.
So doctor runs that program's `check` and reads one JSON object from its stdout. The config is
loaded, the blob files are read and the keys checked by the handler's own code; nothing is
decrypted and no KMS or network call is made.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kmskeys import fileio
from kmskeys.blob import MAX_BLOB_CHARS, BlobFormatError, parse_blob
from kmskeys.checkreport import (
    BlobFinding,
    BlobProblem,
    BlobsMissing,
    BlobsScanned,
    CheckReport,
    ConfigLoaded,
    ConfigRefused,
    GateReport,
    ToolFound,
)
from kmskeys.contract import BLOB_SUFFIX, BUILD_STAMP
from kmskeys.errors import InvalidNameError
from kmskeys.names import validate_name
from resolver import config as config_mod
from resolver.errors import ConfigError, InstallError, RefusedError
from resolver.install import gate_executable, gate_settings
from resolver.policy import check_key
from resolver.settings import declared, toml_keys
from resolver.validators import PROGRAM_KEYS

# What the handler imports for a miss (resolver/install.py check_dependencies imports them).
DEPENDENCIES = ("botocore", "cryptography")
# A blob_dir holding more files than this is reported as truncated (doctor must stay fast).
MAX_BLOB_FILES = 5000


def _config_report(path: Path) -> tuple[ConfigLoaded | ConfigRefused, config_mod.Config | None]:
    try:
        config = config_mod.load(path)
    except ConfigError as exc:
        # An untrusted file or directory says which and why (kmskeys.fileio's problem words:
        # missing, symlink, unsafe, unreadable, not-regular...); anything else is invalid.
        refusal = exc.refusal
        return {
            "ok": False,
            "problem": refusal.problem if refusal is not None else "invalid",
            "path": refusal.path if refusal is not None and refusal.path else str(path),
            "error": exc.reason,
            "key": exc.key,
        }, None
    return {
        "ok": True,
        "prefix": config.prefix,
        "stored_prefix": config.stored_prefix,
        # The AWS sources' prefixes and how many allowlist entries each has (0: it reads none).
        "sources": {
            config.sm_prefix: len(config.sm_secrets),
            config.ssm_prefix: len(config.ssm_parameters),
        },
        "blob_dir": str(config.blob_dir),
        "allow_legacy_blobs": config.allow_legacy_blobs,
        "syslog_socket": str(config.syslog_socket),
        "warm_socket": None if config.warm_socket is None else str(config.warm_socket),
        "key_arns": list(config.key_arns),
        "discovery": config.discovery,
        # What kmskeys-gate must be given on the rule line (install writes it from the config).
        "gate_settings": gate_settings(config),
        # Keys the file sets that mean nothing any more, with what to do about each.
        "obsolete": {key: config_mod.OBSOLETE[key][1] for key in config.obsolete},
        # The per-name rules that bind names to programs (docs/security.md, section 12), for
        # doctor's report of what such a host needs (cgroup v2, Yama, its key count).
        "program_policies": program_policies(config),
        "refresh_ahead": config.refresh_ahead,
        "refresher": refresher_running(config),
        "refresh_records": refresh_records(config),
        "pass_prefix": config.pass_prefix,
        "token_prefix": config.token_prefix,
        "tools": tools(config),
        "keystore": {"dir": str(config.keystore_dir), "flat": flat_entries(config)},
    }, config


def refresher_running(config: config_mod.Config) -> bool | None:
    """Whether a refresh loop (kmskeys-resolver refresh, or the warm daemon's) holds its lock
    in state_dir; None when it cannot be told here (not root)."""
    import fcntl

    from resolver.refresh import LOCK_FILE

    try:
        fd = os.open(config.state_dir / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # drops the lock if this took it
    return False


def refresh_records(config: config_mod.Config) -> int | None:
    """How many answered keys refresh-ahead has recorded (state_dir/refresh/UID/SERIAL, at
    most MAX_BLOB_FILES counted); None when they cannot be read here."""
    from resolver.keyrecords import RECORDS_DIR

    root = config.state_dir / RECORDS_DIR
    count = 0
    try:
        for uid in os.scandir(root):
            if uid.is_dir(follow_symlinks=False):
                count += len(os.listdir(uid.path))
            if count >= MAX_BLOB_FILES:
                break
    except FileNotFoundError:
        return 0
    except OSError:
        return None
    return count


def tools(config: config_mod.Config) -> dict[str, ToolFound]:
    """The programs the pass: and token: backends run, and whether they are there."""
    from resolver.gpgdecrypt import GPG

    module = config.token_module
    return {
        "gpg": {"path": GPG, "ok": os.access(GPG, os.X_OK)},
        "pkcs11": {
            "path": None if module is None else str(module),
            "ok": module is not None and os.path.isfile(module),
        },
    }


def flat_entries(config: config_mod.Config) -> int | None:
    """How many keystore entries are still in the flat layout of kmskeys 0.1 (`stored
    migrate` moves them); None when the keystore cannot be read here."""
    from resolver.keystore_entry import MACHINE_DIR, USER_DIR, parse_flat_name

    root = config.keystore_dir
    if not os.access(root, os.R_OK | os.X_OK):
        return None
    scopes = [root / MACHINE_DIR]
    with contextlib.suppress(OSError):
        scopes += [p for p in (root / USER_DIR).iterdir() if p.is_dir()]
    count = 0
    for scope in scopes:
        try:
            names = os.listdir(scope)
        except OSError:
            continue
        count += sum(1 for n in names if parse_flat_name(n) is not None)
    return count


def program_policies(config: config_mod.Config) -> list[dict[str, Any]]:
    """Each policy rule that sets allow_units, allow_cgroups or allow_exe: its table, glob and
    those keys."""
    found = []
    for f, meta in declared(config_mod.Config):
        for rule in getattr(config, f.name) if meta.rule_keys else ():
            if rule.binds_programs:
                keys = {k: list(getattr(rule, k)) for k in PROGRAM_KEYS if getattr(rule, k)}
                found.append({"table": toml_keys(f, meta)[0], "glob": rule.pattern, **keys})
    return found


def _dependencies() -> str | None:
    """The first dependency of a miss this interpreter cannot find, with the pip line to get it.

    Found, not imported: importing botocore alone takes longer than all of doctor may.
    """
    import importlib.util

    for module in DEPENDENCIES:
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            return (
                f"the resolver's dependency {module} cannot be imported; install them with: "
                f"{sys.executable} -m pip install 'kmskeys[resolver]'"
            )
    return None


def _entries(blob_dir: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every entry below blob_dir (never following a link), with its lstat."""
    for top, dirs, files in os.walk(blob_dir, followlinks=False):
        for entry in sorted(dirs + files):
            path = Path(top) / entry
            try:
                yield path, os.lstat(path)
            except OSError:
                continue  # gone meanwhile


def _blob_problem(config: config_mod.Config, path: Path, st: os.stat_result) -> BlobFinding | None:
    """What the handler would refuse about this entry of blob_dir, or None."""
    relative = os.fspath(path.relative_to(config.blob_dir))
    if stat.S_ISLNK(st.st_mode):
        return {"problem": "symlink", "error": "a symbolic link: the handler never follows one"}
    try:
        if stat.S_ISDIR(st.st_mode):
            fileio.check_stat(st, "directory", fileio.DIRECTORY)
            return None
        if not relative.endswith(BLOB_SUFFIX):
            return None  # never read by the handler
        fileio.check_stat(st, "blob", fileio.REGULAR)
    except fileio.UntrustedFileError as exc:
        found = {fileio.UNSAFE: "unsafe-dir" if stat.S_ISDIR(st.st_mode) else "unsafe"}
        return {"problem": found.get(exc.problem, exc.problem), "error": _detail(exc)}
    name = relative[: -len(BLOB_SUFFIX)]
    try:
        validate_name(name)
    except InvalidNameError as exc:
        return {"problem": "bad-name", "error": str(exc)}
    try:
        text = fileio.read_below(
            config.blob_dir, relative, MAX_BLOB_CHARS + 2, f"blob_dir {config.blob_dir}", "blob"
        )
    except fileio.UntrustedFileError as exc:
        if exc.problem == fileio.MISSING:
            return None  # removed meanwhile
        unreadable = exc.problem == fileio.UNREADABLE
        return {"problem": "unreadable" if unreadable else "refused", "error": str(exc)}
    return _blob_text_problem(config, name, text)


def _detail(exc: fileio.UntrustedFileError) -> str:
    # "is unsafe: owned by uid 5, not root" -> "owned by uid 5, not root"
    return exc.detail.removeprefix("is unsafe: ")


def _blob_text_problem(config: config_mod.Config, name: str, text: bytes) -> BlobFinding | None:
    try:
        blob = parse_blob(text, allow_legacy=config.allow_legacy_blobs)
        not_after = blob.not_after
    except BlobFormatError as exc:
        return {"problem": "unparseable", "error": exc.reason}
    try:
        blob.check_request(name, None)  # the handler refuses a blob made for another name
    except BlobFormatError as exc:
        return {"problem": "misnamed", "error": exc.reason}
    if not_after is not None and datetime.now(UTC) > not_after:
        return {"problem": "expired", "error": f"expired at {not_after:%Y-%m-%dT%H:%M:%SZ}"}
    try:
        check_key(config, blob)
    except RefusedError as exc:
        return {"problem": "key", "error": exc.reason, "key_arn": blob.key_arn}
    return None


def _blobs_report(config: config_mod.Config) -> BlobsMissing | BlobsScanned:
    blob_dir = config.blob_dir
    try:
        label = f"blob_dir {blob_dir}"
        fileio.check_path(blob_dir, label, fileio.DIRECTORY, fileio.FOLLOW)
    except fileio.UntrustedFileError as exc:
        if exc.problem in (fileio.MISSING, fileio.UNSAFE):
            return {"problem": exc.problem, "error": _detail(exc)}
        return {"problem": "unreadable", "error": exc.detail}
    if not os.access(blob_dir, os.R_OK | os.X_OK):
        return {"problem": "unreadable", "error": "permission denied"}
    problems: list[BlobProblem] = []
    count = 0
    truncated = False
    for path, entry in _entries(blob_dir):
        if count >= MAX_BLOB_FILES:
            truncated = True
            break
        if stat.S_ISREG(entry.st_mode) and path.name.endswith(BLOB_SUFFIX):
            count += 1
        found = _blob_problem(config, path, entry)
        if found is not None:
            problems.append({"path": str(path), **found})
    return {"problem": None, "files": count, "truncated": truncated, "problems": problems}


def _gate_report() -> GateReport:
    """The installed kmskeys-gate's build stamp against this resolver's (kmskeys/contract.h)."""
    import subprocess

    try:
        gate = gate_executable()
        done = subprocess.run(
            [str(gate), "--stamp"], capture_output=True, text=True, timeout=5, check=False
        )
    except (InstallError, OSError, subprocess.SubprocessError) as exc:
        return {"ok": False, "problem": "missing", "error": str(exc), "expected": BUILD_STAMP}
    stamp = done.stdout.strip()
    return {
        "ok": stamp == BUILD_STAMP,
        "problem": None if stamp == BUILD_STAMP else "stale",
        "path": str(gate),
        "stamp": stamp,
        "expected": BUILD_STAMP,
    }


def report(path: Path) -> CheckReport:
    """The whole verdict for the config at `path`: JSON-ready."""
    path = Path(os.path.abspath(path))
    config_report, config = _config_report(path)
    return {
        "config_path": str(path),
        "resolver": os.path.abspath(sys.argv[0]),
        "python": sys.executable,
        "config": config_report,
        "known_keys": list(config_mod.known_keys()),
        "dependencies": _dependencies(),
        # A gate built from other sources is refused by every handler run (EAGAIN, at ERR).
        "gate": _gate_report(),
        "blobs": None if config is None else _blobs_report(config),
    }


def main(argv: list[str]) -> int:
    """`check [--config PATH]`: print the report as one JSON object; 0 even when it finds faults."""
    path = config_mod.DEFAULT_PATH
    if argv[:1] == ["--config"] and len(argv) == 2:
        path = Path(argv[1])
    elif argv:
        print("usage: kmskeys-resolver check [--config PATH]", file=sys.stderr)
        return 2
    json.dump(report(path), sys.stdout)
    sys.stdout.write("\n")
    return 0
