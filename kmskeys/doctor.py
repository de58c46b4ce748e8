"""`kmskeys doctor`: check this host's kmskeys set-up and print one line, with a fix, per finding.

Stdlib and the keyutils binding only (no boto3): it runs as an app user as well as root.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

from kmskeys import contract
from kmskeys.contract import DEFAULT_PREFIX, rule_file_name
from kmskeys.trust import peer_uid, unsafe_reason

REQUEST_KEY = Path(contract.REQUEST_KEY)
REQUEST_KEY_D = Path(contract.REQUEST_KEY_D)
DEFAULT_CONFIG = Path(contract.DEFAULT_CONFIG)
DEFAULT_BLOB_DIR = Path(contract.DEFAULT_BLOB_DIR)
PROC_KEY_USERS = Path("/proc/key-users")
QUOTA_WARN_FRACTION = 0.8

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"
Finding = tuple[str, str]


def check_request_key(prefix: str) -> Iterator[Finding]:
    """request-key present, and a rule for PREFIX:* installed."""
    if not os.access(REQUEST_KEY, os.X_OK):
        yield (
            FAIL,
            f"{REQUEST_KEY} missing; fix: apt-get install keyutils (or dnf install keyutils)",
        )
        return
    yield OK, f"{REQUEST_KEY} present"
    rule = REQUEST_KEY_D / rule_file_name(prefix)
    try:
        lines = rule.read_text().splitlines()
    except OSError:
        yield FAIL, f"no rule {rule}; fix: kmskeys-resolver install --prefix {prefix}"
        return
    rules = [line for line in lines if line.split()[:3] == ["create", "user", f"{prefix}:*"]]
    if not rules:
        yield FAIL, f"{rule} has no rule for {prefix}:*; fix: kmskeys-resolver install"
        return
    program = Path(rules[0].split()[4])
    if not os.access(program, os.X_OK):
        yield FAIL, f"{rule} runs {program}, which is missing; fix: kmskeys-resolver install"
        return
    yield OK, f"rule {rule} runs {program}"


def check_upcalls() -> Iterator[Finding]:
    """Whether a miss runs request-key here, for root and for a non-root requester (probed)."""
    if os.geteuid() != 0:
        yield (
            INFO,
            (
                "upcall probe not run (its throwaway rule in /etc/request-key.d needs root): "
                "a miss that fails at once with ENOENT means request-key does not run for this "
                "user; run doctor as root to probe"
            ),
        )
        return
    from kmskeys.upcall_probe import probe_upcalls

    try:
        caps = probe_upcalls()
    except (OSError, ValueError) as exc:
        yield WARN, f"upcall probe could not run ({exc})"
        return
    if not caps.root.works:
        yield (
            FAIL,
            (
                f"a root request under a throwaway rule did not resolve, {caps.root}: no miss can "
                f"resolve here; fix: check that {REQUEST_KEY} runs (keyctl request2 user debug:x y)"
            ),
        )
    elif not caps.non_root.works:
        yield (
            WARN,
            (
                f"request-key does not run for non-root requesters here (uid {caps.uid}: "
                f"{caps.non_root}): misses of apps running as non-root never resolve; fix: resolve "
                "their secrets as root on their behalf before each ttl ends (docs/reliability.md, "
                "hosts that refuse non-root upcalls)"
            ),
        )
    else:
        yield (
            OK,
            f"request-key runs for root and for a non-root requester (probed as uid {caps.uid})",
        )


def check_config(path: Path) -> Iterator[Finding]:
    """The resolver config: root-owned, not group/world-writable, valid TOML."""
    try:
        st = path.stat()
    except FileNotFoundError:
        yield FAIL, f"config {path} missing; fix: kmskeys-resolver install --config {path}"
        return
    reason = unsafe_reason(st)
    if reason:
        yield FAIL, f"config {path} is {reason}; fix: chown root:root {path}; chmod 644 {path}"
        return
    try:
        tomllib.loads(path.read_text())
    except PermissionError:
        yield INFO, f"config {path} is safe but unreadable by this user; run doctor as root"
        return
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        yield FAIL, f"config {path} is not valid TOML ({exc}); fix it (docs/resolver.md)"
        return
    yield OK, f"config {path} is root-owned and safe"


def _config_path(config: Path, key: str) -> Path | None:
    """The path the config sets for `key`; None when unset or unreadable."""
    try:
        value = tomllib.loads(config.read_text()).get(key)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return Path(value) if isinstance(value, str) else None


def blob_dir_of(config: Path) -> Path:
    """The config's blob_dir, or the default when unset or unreadable."""
    return _config_path(config, "blob_dir") or DEFAULT_BLOB_DIR


def check_warm_daemon(config: Path) -> Iterator[Finding]:
    """Whether misses go through the warm daemon or decrypt cold (bench/results.md: how long)."""
    path = _config_path(config, "warm_socket")
    if path is None:
        yield (
            INFO,
            (
                "warm daemon off: each miss loads botocore; for faster misses set warm_socket "
                "and run kmskeys-resolver serve (docs/resolver.md)"
            ),
        )
        return
    if os.geteuid() != 0:
        yield INFO, f"warm daemon at {path} answers root only; run doctor as root to check it"
        return
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(1.0)
        try:
            conn.connect(os.fspath(path))
            uid = peer_uid(conn)
        except OSError as exc:
            yield (
                WARN,
                (
                    f"warm_socket {path} set but no daemon answers ({exc.strerror}): misses "
                    "decrypt cold; fix: systemctl enable --now kmskeys-resolver"
                ),
            )
            return
    if uid != 0:
        yield (
            FAIL,
            f"warm_socket {path} is served by uid {uid}: the handler refuses it; fix: stop it",
        )
        return
    yield OK, f"warm daemon answering on {path}"


def check_blob_dir(path: Path) -> Iterator[Finding]:
    """The blob directory: root-owned and not writable by group or others."""
    try:
        st = path.stat()
    except FileNotFoundError:
        yield WARN, f"blob_dir {path} missing; fix: kmskeys-resolver install (or mkdir -m 755)"
        return
    except PermissionError:
        yield INFO, f"blob_dir {path} is not visible to this user; run doctor as root"
        return
    reason = unsafe_reason(st)
    if reason:
        yield FAIL, f"blob_dir {path} is {reason}; fix: chown root:root {path}; chmod 755 {path}"
        return
    yield OK, f"blob_dir {path} is root-owned and safe"


def check_quota(uid: int) -> Iterator[Finding]:
    """This uid's kernel key quota headroom (/proc/key-users against maxkeys/maxbytes)."""
    try:
        lines = PROC_KEY_USERS.read_text().splitlines()
    except OSError as exc:
        yield WARN, f"cannot read {PROC_KEY_USERS} ({exc.strerror})"
        return
    for line in lines:
        head, _, rest = line.partition(":")
        if head.strip() != str(uid):
            continue
        # "<uid>: <usage> <nkeys>/<nikeys> <qnkeys>/<maxkeys> <qnbytes>/<maxbytes>"
        fields = rest.split()
        keys, max_keys = (int(x) for x in fields[2].split("/"))
        used, max_bytes = (int(x) for x in fields[3].split("/"))
        if keys >= QUOTA_WARN_FRACTION * max_keys or used >= QUOTA_WARN_FRACTION * max_bytes:
            yield (
                WARN,
                (
                    f"uid {uid} uses {keys}/{max_keys} keys and {used}/{max_bytes} bytes of "
                    "its key quota; fix: raise sysctl kernel.keys.maxkeys and kernel.keys.maxbytes"
                ),
            )
        else:
            yield OK, f"uid {uid} key quota: {keys}/{max_keys} keys, {used}/{max_bytes} bytes"
        return
    yield OK, f"uid {uid} holds no keys yet (quota untouched)"


def check_session_keyring() -> Iterator[Finding]:
    """Which session keyring this process uses, and who shares the cached keys with it."""
    from kmskeys.key import Keyring

    try:
        desc = Keyring.session(create=False).describe().description
    except Exception:
        yield (
            WARN,
            (
                "no session keyring: cached keys go to the user session keyring; under systemd set "
                "KeyringMode=private (the default) or shared"
            ),
        )
        return
    if desc.startswith("_uid_ses."):
        yield (
            INFO,
            (
                "session keyring is this user's default one: every process of the user shares the "
                "cache; under systemd, services get a private one (KeyringMode=private)"
            ),
        )
    elif desc == "_ses":
        yield (
            INFO,
            (
                "session keyring is a private one (_ses): only this process tree shares the cache, "
                "e.g. a service under systemd KeyringMode=private and its CGI children"
            ),
        )
    else:
        yield INFO, f"session keyring {desc!r}: processes that joined it share the cache"


def check_imds(uid: int) -> Iterator[Finding]:
    """IMDS must be unreachable by app users (only root / the resolver may reach it)."""
    from kmskeys import imds

    results = imds.probe(0.5)
    reachable = [r for r in results if r.reachable]
    if not reachable:
        shown = ", ".join(str(r) for r in results)
        yield OK, f"IMDS not reachable by uid {uid} ({shown})"
    elif uid == 0:
        yield OK, f"IMDS reachable by root ({reachable[0].endpoint}), as the resolver needs"
    else:
        yield (
            FAIL,
            (
                f"IMDS reachable by uid {uid} ({reachable[0].endpoint}): this user can borrow the "
                "instance role; fix: kmskeys-resolver firewall install"
            ),
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run every check; exit 1 if any finding is a failure."""
    parser = argparse.ArgumentParser(prog="kmskeys doctor", description=__doc__)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="description namespace")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="resolver config")
    args = parser.parse_args(list(argv or []))
    uid = os.getuid()
    checks = (
        check_request_key(args.prefix),
        check_upcalls(),
        check_config(args.config),
        check_blob_dir(blob_dir_of(args.config)),
        check_warm_daemon(args.config),
        check_quota(uid),
        check_session_keyring(),
        check_imds(uid),
    )
    failed = False
    for findings in checks:
        for level, message in findings:
            failed |= level == FAIL
            print(f"{level:<4} {message}")
    return 1 if failed else 0
