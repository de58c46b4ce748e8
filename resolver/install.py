"""`kmskeys-resolver install / uninstall`: the request-key rule, the config, the blob directory.

The rule file records what install created, so uninstall removes exactly that and nothing an
administrator added or changed since.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmskeys import contract, fileio
from kmskeys.contract import DEFAULT_PREFIX, rule_file_name
from kmskeys.names import MAX_PREFIX_BYTES, validate_prefix
from kmskeys.rules import RuleError, format_rule
from resolver import config as config_mod
from resolver.config_text import template, toml_value
from resolver.errors import ConfigError, InstallError
from resolver.installclash import (
    check_clashes,
    ensure_state_dir,
    kept_record,
    make_record,
    remove_state_record,
    write_state_record,
)
from resolver.registry import SHIPPED

REQUEST_KEY_D = Path(contract.REQUEST_KEY_D)
MARKER = "# kmskeys-resolver install"
GATE = contract.GATE_PROGRAM
_CREATED_CONFIG = "# created-config: "
_CREATED_DIR = "# created-dir: "


@dataclass
class Manifest:
    """What install created: the config (with its digest at creation) and directories."""

    config: tuple[Path, str] | None = None
    dirs: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The manifest as request-key.conf comment lines."""
        out = []
        if self.config is not None:
            out.append(f"{_CREATED_CONFIG}{self.config[0]} sha256={self.config[1]}")
        out += [f"{_CREATED_DIR}{d}" for d in self.dirs]
        return out

    @classmethod
    def parse(cls, text: str) -> Manifest:
        """Read the manifest back from a rule file written by install."""
        manifest = cls()
        for line in text.splitlines():
            if line.startswith(_CREATED_CONFIG):
                path, _, digest = line[len(_CREATED_CONFIG) :].rpartition(" sha256=")
                manifest.config = (Path(path), digest)
            elif line.startswith(_CREATED_DIR):
                manifest.dirs.append(Path(line[len(_CREATED_DIR) :]))
        return manifest


def rule_path(prefix: str, request_key_d: Path = REQUEST_KEY_D) -> Path:
    """`kmskeys.conf` for the default prefix, `kmskeys-PREFIX.conf` for any other."""
    return request_key_d / rule_file_name(prefix)


def resolver_executable() -> Path:
    """The absolute path of this installation's `kmskeys-resolver` console script."""
    argv0 = Path(sys.argv[0])
    candidates = []
    if argv0.name == "kmskeys-resolver":
        candidates.append(Path(os.path.abspath(argv0)))
    candidates.append(Path(os.path.abspath(sys.executable)).parent / "kmskeys-resolver")
    found = shutil.which("kmskeys-resolver")
    if found:
        candidates.append(Path(os.path.abspath(found)))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise InstallError("cannot find the kmskeys-resolver executable of this installation")


def gate_executable() -> Path:
    """This installation's `kmskeys-gate` (resolver/gate.c), which the wheel carries."""
    path = Path(os.path.abspath(__file__)).parent / GATE
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise InstallError(
            f"{path} is missing: reinstall kmskeys from its wheel (a source build needs a C "
            "compiler)"
        )
    try:
        fileio.check_path(path, str(path), fileio.REGULAR, fileio.FOLLOW)
    except fileio.UntrustedFileError as exc:
        raise InstallError(f"{path} is unsafe for root to run: {exc.detail}") from None
    return path


# The gate's DAEMON_SOCKET when no resolver daemon is configured.
NO_DAEMON = "-"


def gate_settings(config: config_mod.Config) -> list[str]:
    """What the rule hands kmskeys-gate from the config (resolver/gate.c's usage line): the
    limits and log settings, then the resolver daemon's socket (or `-`), how long the daemon
    may take to accept a miss in milliseconds, and whether subuids are aggregated (1 or 0)."""
    return [
        str(config.state_dir),
        str(config.max_concurrent_per_uid),
        str(config.negative_ttl),
        str(config.syslog_socket),
        str(config_mod.FACILITIES[config.syslog_facility]),
        NO_DAEMON if config.warm_socket is None else str(config.warm_socket),
        str(max(1, round(config.daemon_wait * 1000))),
        "1" if config.aggregate_subuids else "0",
    ]


def rule_line(
    prefix: str,
    executable: Path,
    config_path: Path,
    config: config_mod.Config | None = None,
    gate: Path | None = None,
) -> str:
    """The request-key.conf line that routes `PREFIX:*` requests to the handler.

    The gate runs first: it takes the requester's slot (max_concurrent_per_uid) or rejects the
    key EAGAIN, without starting Python, then hands the miss to the resolver daemon when one is
    configured and answering. It gets the config values it needs here, so a change of
    state_dir, max_concurrent_per_uid, negative_ttl, the syslog settings, warm_socket,
    daemon_wait or aggregate_subuids needs a re-run of install (the handler refuses a slot the
    config does not allow, and doctor says so).
    """
    config = config_mod.load(config_path) if config is None else config
    gate = gate_executable() if gate is None else gate
    paths = [("state_dir", config.state_dir), ("syslog_socket", config.syslog_socket)]
    if config.warm_socket is not None:
        paths.append(("warm_socket", config.warm_socket))
    for what, path in paths:
        # Handed to the gate on the rule line, which request-key splits on whitespace.
        if any(ch.isspace() for ch in str(path)) or not path.is_absolute():
            raise InstallError(f"{what} path {str(path)!r} must be absolute and without spaces")
    try:
        return format_rule(prefix, executable, config_path, gate, gate_settings(config))
    except RuleError as exc:
        raise InstallError(str(exc)) from None


def _toml_list(items: Sequence[str]) -> str:
    return toml_value(list(items))


def default_config_text(
    prefix: str, blob_dir: Path, key_arns: Sequence[str] = (), own: bool = False
) -> str:
    """The config install writes when none exists: every key, commented out at its default,
    except the ones given (made from the settings tables, resolver/config_text.py). `own`: a
    config beside the default one, which gets host-wide things of its own (a second install
    may not share them: resolver/installclash.py)."""
    values: dict[str, object] = {}
    if key_arns:
        values["key_arns"] = list(key_arns)
    if prefix != DEFAULT_PREFIX:
        values["prefix"] = prefix
    if blob_dir != config_mod.DEFAULT_BLOB_DIR:
        values["blob_dir"] = blob_dir
    if own:
        values["state_dir"] = Path(f"/run/kmskeys-{prefix}")
        values["keystore_dir"] = Path(f"/var/lib/kmskeys-{prefix}")
        stored = f"{prefix}-stored"
        if len(stored) <= MAX_PREFIX_BYTES:
            values["stored_prefix"] = stored
    return template(values)


def _prefix_for(
    config_path: Path, prefix: str | None, *, strict: bool = True
) -> tuple[str, config_mod.Config | None]:
    if not config_path.exists():
        return validate_prefix(prefix or DEFAULT_PREFIX), None
    try:
        config = config_mod.load(config_path)
    except ConfigError as exc:
        # uninstall must work even when the config has gone bad since, given the prefix.
        if not strict and prefix is not None:
            return validate_prefix(prefix), None
        raise InstallError(exc.reason) from None
    if prefix is not None and prefix != config.prefix:
        raise InstallError(
            f"--prefix {prefix!r} differs from prefix {config.prefix!r} in {config_path}"
        )
    return config.prefix, config


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, text: str, mode: int) -> None:
    # A temp file beside it, fsync'd, renamed over it: readers (request-key, the handler) see
    # the old file or the new one, never half of one.
    fileio.write_atomic(path, text.encode(), mode)


def _mkdirs(path: Path, manifest: Manifest, actions: list[str], mode: int = 0o755) -> None:
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):
        directory.mkdir(mode=mode if directory == path else 0o755)
        os.chown(directory, 0, 0)
        os.chmod(directory, mode if directory == path else 0o755)  # whatever the umask
        manifest.dirs.append(directory)
        actions.append(f"created directory {directory}")


def check_dependencies() -> None:
    """Raise InstallError unless the resolver's own imports work (a client-only install lacks
    them, and every miss would then fail)."""
    try:
        import botocore.session  # noqa: F401
        import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
    except ImportError as exc:
        raise InstallError(
            f"the resolver's dependency {exc.name or exc} cannot be imported; install them "
            f"with: {sys.executable} -m pip install 'kmskeys[resolver]'"
        ) from None


def ensure_admin_group(actions: list[str]) -> None:
    """Create the admin group (kmskeys.contract.ADMIN_GROUP) with no members, if missing.

    uninstall leaves it: live keys carry its gid, and a later group given the same gid (with
    members) would get VIEW and SEARCH on them.
    """
    try:
        group = grp.getgrnam(contract.ADMIN_GROUP)
    except KeyError:
        done = subprocess.run(
            ["groupadd", "--system", contract.ADMIN_GROUP],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise InstallError(
                f"cannot create group {contract.ADMIN_GROUP}: {done.stderr.strip()}"
            ) from None
        actions.append(f"created group {contract.ADMIN_GROUP} (no members; uninstall keeps it)")
        return
    if group.gr_mem:
        # The resolver will not use a group with members (resolver/handler.py admin_group).
        raise InstallError(
            f"group {contract.ADMIN_GROUP} has members ({', '.join(group.gr_mem)}): it must have "
            "none, since a member could find and so read every cached key; remove them"
        )


def _add_key_arns(config: config_mod.Config, key_arns: Sequence[str], actions: list[str]) -> None:
    if not key_arns or set(config.key_arns) == set(key_arns):
        return
    if config.key_arns or config.discovery:
        raise InstallError(
            f"{config.path} already lists other keys (key_arns or discovery); edit it by hand"
        )
    # Top-level keys must come before the first [table]: prepending is always valid TOML.
    text = config.path.read_text()
    added = f"# added by kmskeys-resolver install\nkey_arns = {_toml_list(key_arns)}\n\n"
    _write_atomic(config.path, added + text, stat.S_IMODE(config.path.stat().st_mode))
    actions.append(f"added key_arns to {config.path}")


def install(
    config_path: Path = config_mod.DEFAULT_PATH,
    prefix: str | None = None,
    request_key_d: Path = REQUEST_KEY_D,
    key_arns: Sequence[str] = (),
    rules: str = "kms",
) -> list[str]:
    """Install the rule(s) (and a config, blob_dir, keystore when missing); say what was done.

    `rules` names the backends whose prefixes the one rule file routes to the handler
    (`routed_backends`); with `kms`, the `sm:` and `ssm:` prefixes too when the config lists
    secrets or parameters for them (`aws_sources`).
    """
    backends = routed_backends(rules)
    check_dependencies()
    config_path = Path(os.path.abspath(config_path))
    prefix, config = _prefix_for(config_path, prefix)
    target = rule_path(prefix, request_key_d)
    manifest = Manifest()
    if target.exists():
        manifest = Manifest.parse(target.read_text())
    elif config is not None and (kept := kept_record(config.state_dir, config_path)) is not None:
        # The rule file is gone, the install's record is not: what it created stays listed.
        manifest = Manifest.parse(kept)
    actions: list[str] = []
    for arn in key_arns:
        try:
            config_mod.parse({"key_arns": [arn]}, config_path)
        except ConfigError as exc:
            raise InstallError(f"--key-arn: {exc.reason}") from None
    wrote_config, made = config is None, len(manifest.dirs)
    if config is None:
        _mkdirs(config_path.parent, manifest, actions)
        # Next to a config of its own, not the default install's blob_dir.
        blob_dir = (
            config_mod.DEFAULT_BLOB_DIR
            if config_path == config_mod.DEFAULT_PATH
            else config_path.parent / "secrets"
        )
        own = config_path != config_mod.DEFAULT_PATH
        _write_atomic(config_path, default_config_text(prefix, blob_dir, key_arns, own), 0o644)
        manifest.config = (config_path, _digest(config_path))
        actions.append(f"wrote {config_path}")
        config = config_mod.load(config_path)
    else:
        _add_key_arns(config, key_arns, actions)
        config = config_mod.load(config_path)
    routed = [getattr(config, spec.prefix_setting) for spec, _ in SHIPPED if spec.name in backends]
    if "kms" in backends:
        routed += [p for p in aws_sources(config) if p not in routed]
    executable, gate = resolver_executable(), gate_executable()
    record = make_record(config, rules, routed, executable)
    try:
        # Before anything more is written: a second install shares nothing with the first.
        check_clashes(record, target, request_key_d, new_config=wrote_config)
    except InstallError:
        _undo(manifest, wrote_config, made)
        raise
    if {"kms", "token"} & set(backends):
        _mkdirs(config.blob_dir, manifest, actions)
    if "stored" in backends:
        # Root's alone, 0700: the stored: keys live here (resolver/keystore.py).
        _mkdirs(config.keystore_dir, manifest, actions, mode=0o700)
    if not request_key_d.is_dir():
        raise InstallError(f"{request_key_d} is missing: install the keyutils package")
    ensure_admin_group(actions)
    try:
        if ensure_state_dir(record):
            manifest.dirs.append(Path(record.state_dir))
            actions.append(f"created directory {record.state_dir}")
        write_state_record(record, manifest.lines())
    except (fileio.UntrustedFileError, OSError) as exc:
        raise InstallError(f"state_dir {record.state_dir}: {exc}") from None
    text = "\n".join(
        [
            f"{MARKER} (prefix {prefix}); `kmskeys-resolver uninstall` removes this file.",
            record.line(),
            *manifest.lines(),
            *(rule_line(p, executable, config_path, config, gate) for p in routed),
            "",
        ]
    )
    if not target.exists() or target.read_text() != text:
        _write_atomic(target, text, 0o644)
        actions.append(f"wrote {target}")
    return actions or [f"{target} already up to date"]


def _undo(manifest: Manifest, wrote_config: bool, made: int) -> None:
    """Remove what this refused install created: its config and the directories it made (those
    after the first `made` of the manifest)."""
    if wrote_config and manifest.config is not None:
        manifest.config[0].unlink(missing_ok=True)
    for directory in reversed(manifest.dirs[made:]):
        with contextlib.suppress(OSError):
            directory.rmdir()


def routed_backends(rules: str) -> list[str]:
    """The backends `--rules` names: `kms,pass`, `both` (kms and stored) or `all`."""
    shipped = [spec.name for spec, _ in SHIPPED]
    if rules in ("both", "all"):
        return ["kms", "stored"] if rules == "both" else shipped
    names = [name.strip() for name in rules.split(",")]
    unknown = [name for name in names if name not in shipped]
    if unknown or not names:
        raise InstallError(
            f"--rules {rules!r}: name backends among {', '.join(shipped)} (comma-separated), "
            "or both, or all"
        )
    return names


def aws_sources(config: config_mod.Config) -> list[str]:
    """The prefixes of the AWS sources the config reads (`sm:` with `sm_secrets`, `ssm:` with
    `ssm_parameters`): routed with the `kms:` rule, since the same AWS set-up serves them."""
    return [config.sm_prefix] * bool(config.sm_secrets) + [config.ssm_prefix] * bool(
        config.ssm_parameters
    )


def uninstall(
    config_path: Path = config_mod.DEFAULT_PATH,
    prefix: str | None = None,
    request_key_d: Path = REQUEST_KEY_D,
) -> list[str]:
    """Remove the rule and whatever install created (unless changed since); say what was done."""
    config_path = Path(os.path.abspath(config_path))
    prefix, _ = _prefix_for(config_path, prefix, strict=False)
    target = rule_path(prefix, request_key_d)
    if not target.exists():
        return [f"{target} not installed; nothing to do"]
    text = target.read_text()
    if not text.startswith(MARKER):
        raise InstallError(f"{target} was not written by kmskeys-resolver install; left alone")
    manifest = Manifest.parse(text)
    actions = []
    # The rule goes first: no upcall may reach a half-removed installation.
    target.unlink()
    actions.append(f"removed {target}")
    removed = remove_state_record(text)
    if removed is not None:
        actions.append(f"removed {removed}")
    if manifest.config is not None:
        path, digest = manifest.config
        if path.is_file() and _digest(path) == digest:
            path.unlink()
            actions.append(f"removed {path}")
        elif path.exists():
            actions.append(f"kept {path} (changed since install)")
    for directory in reversed(manifest.dirs):
        try:
            directory.rmdir()
            actions.append(f"removed directory {directory}")
        except FileNotFoundError:
            pass
        except OSError:
            actions.append(f"kept directory {directory} (not empty)")
    return actions
