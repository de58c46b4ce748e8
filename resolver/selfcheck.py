"""`kmskeys-resolver check`: the resolver's own verdict on its config, dependencies and blobs.

`kmskeys doctor` may not import the resolver (the import contracts keep the client apart), and
the resolver that matters is the one the installed rule runs, possibly in another environment.
So doctor runs that program's `check` and reads one JSON object from its stdout. The config is
loaded, the blob files are read and the keys checked by the handler's own code; nothing is
decrypted and no KMS or network call is made.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kmskeys.blob import MAX_BLOB_CHARS, BlobFormatError, parse_blob
from kmskeys.contract import BLOB_SUFFIX
from kmskeys.errors import InvalidNameError
from kmskeys.names import validate_name
from kmskeys.trust import unsafe_reason
from resolver import config as config_mod
from resolver.errors import ConfigError, RefusedError, UnknownSecretError
from resolver.install import gate_settings
from resolver.policy import check_key
from resolver.safefile import read_below

# What the handler imports for a miss (resolver/install.py check_dependencies imports them).
DEPENDENCIES = ("botocore", "cryptography")
# A blob_dir holding more files than this is reported as truncated (doctor must stay fast).
MAX_BLOB_FILES = 5000


def _config_report(path: Path) -> tuple[dict[str, Any], config_mod.Config | None]:
    try:
        config = config_mod.load(path)
    except ConfigError as exc:
        problem, where = _config_problem(path)
        return {
            "ok": False,
            "problem": problem,
            "path": str(where),
            "error": exc.reason,
            "key": exc.key,
        }, None
    return {
        "ok": True,
        "prefix": config.prefix,
        "stored_prefix": config.stored_prefix,
        "blob_dir": str(config.blob_dir),
        "allow_legacy_blobs": config.allow_legacy_blobs,
        "syslog_socket": str(config.syslog_socket),
        "warm_socket": None if config.warm_socket is None else str(config.warm_socket),
        "key_arns": list(config.key_arns),
        "discovery": config.discovery,
        # What kmskeys-gate must be given on the rule line (install writes it from the config).
        "gate_settings": gate_settings(config),
    }, config


def _config_problem(path: Path) -> tuple[str, Path]:
    """Why load() failed, as one word doctor maps to a fix, and the path at fault."""
    for where in (path.parent, path):
        try:
            st = os.lstat(where)
        except FileNotFoundError:
            return "missing", where
        except OSError:
            return "unreadable", where
        if stat.S_ISLNK(st.st_mode):
            return "symlink", where
        if unsafe_reason(st):
            return "unsafe", where
    if not os.access(path, os.R_OK):
        return "unreadable", path
    return "invalid", path


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


def _blob_problem(
    config: config_mod.Config, path: Path, st: os.stat_result
) -> dict[str, Any] | None:
    """What the handler would refuse about this entry of blob_dir, or None."""
    relative = os.fspath(path.relative_to(config.blob_dir))
    if stat.S_ISLNK(st.st_mode):
        return {"problem": "symlink", "error": "a symbolic link: the handler never follows one"}
    if stat.S_ISDIR(st.st_mode):
        reason = unsafe_reason(st)
        return None if reason is None else {"problem": "unsafe-dir", "error": reason}
    if not relative.endswith(BLOB_SUFFIX):
        return None  # never read by the handler
    if not stat.S_ISREG(st.st_mode):
        return {"problem": "not-regular", "error": "not a regular file"}
    reason = unsafe_reason(st)
    if reason:
        return {"problem": "unsafe", "error": reason}
    name = relative[: -len(BLOB_SUFFIX)]
    try:
        validate_name(name)
    except InvalidNameError as exc:
        return {"problem": "bad-name", "error": str(exc)}
    try:
        text = read_below(config.blob_dir, relative, MAX_BLOB_CHARS + 2, "blob")
    except UnknownSecretError:
        return None  # removed meanwhile
    except RefusedError as exc:
        unreadable = "Permission denied" in exc.reason
        return {"problem": "unreadable" if unreadable else "refused", "error": exc.reason}
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


def _blobs_report(config: config_mod.Config) -> dict[str, Any]:
    blob_dir = config.blob_dir
    try:
        st = os.stat(blob_dir)
    except FileNotFoundError:
        return {"problem": "missing"}
    except OSError as exc:
        return {"problem": "unreadable", "error": exc.strerror}
    reason = unsafe_reason(st)
    if reason:
        return {"problem": "unsafe", "error": reason}
    if not os.access(blob_dir, os.R_OK | os.X_OK):
        return {"problem": "unreadable", "error": "permission denied"}
    problems: list[dict[str, Any]] = []
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


def report(path: Path) -> dict[str, Any]:
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
