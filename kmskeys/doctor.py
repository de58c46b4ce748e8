"""`kmskeys doctor`: check this host's kmskeys set-up; one line per finding, with a fix to paste.

Every `FAIL` and `warn` carries a command that fixes it when pasted into a root shell. The rule
in /etc/request-key.d says which resolver and config a miss really uses; that resolver judges
its own config, dependencies and blob files (`kmskeys-resolver check`, run in its interpreter),
because this client never imports the resolver. Nothing is decrypted and KMS is never called.
`--json` prints the same findings as one JSON object.

Stdlib and the keyutils binding only (no boto3): it runs as an app user as well as root.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmskeys import contract, imds, keyutils
from kmskeys.contract import DEFAULT_PREFIX, GATE_PROGRAM, rule_file_name
from kmskeys.errors import KeyctlError
from kmskeys.trust import peer_uid, unsafe_reason
from kmskeys.upcall_probe import nobody, probe_upcalls

REQUEST_KEY = Path(contract.REQUEST_KEY)
REQUEST_KEY_D = Path(contract.REQUEST_KEY_D)
DEFAULT_CONFIG = Path(contract.DEFAULT_CONFIG)
DEV_LOG = Path("/dev/log")
KMSG = Path("/dev/kmsg")
PROC_KEY_USERS = Path("/proc/key-users")
QUOTA_WARN_FRACTION = 0.8
CHECK_TIMEOUT = 10.0
# The request-key macros `kmskeys-resolver install` writes (resolver/handler.py MACROS).
RULE_MACROS = ["%k", "%d", "%u", "%g", "%T", "%P", "%S"]

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"
LEVELS = (OK, INFO, WARN, FAIL)


@dataclass(frozen=True)
class Finding:
    """One thing doctor found: its level, which check, what it means, and the fix to paste."""

    level: str
    check: str
    message: str
    fix: str | None = None

    def line(self) -> str:
        """The text form: `FAIL message; fix: command`."""
        tail = f"; fix: {self.fix}" if self.fix else ""
        return f"{self.level:<4} {self.message}{tail}"

    def as_dict(self) -> dict[str, str | None]:
        """The JSON form."""
        return {"level": self.level, "check": self.check, "message": self.message, "fix": self.fix}


def q(value: object) -> str:
    """`value` quoted for a POSIX shell, as a fix command pastes it."""
    return shlex.quote(os.fspath(value) if isinstance(value, Path) else str(value))


def own_resolver() -> Path | None:
    """The kmskeys-resolver of this installation (next to this interpreter), or on PATH."""
    sibling = Path(sys.executable).parent / "kmskeys-resolver"
    if os.access(sibling, os.X_OK):
        return sibling
    found = shutil.which("kmskeys-resolver")
    return Path(found) if found else None


def resolver_command() -> str:
    """How a fix names kmskeys-resolver: the absolute path of this installation's, if any."""
    found = own_resolver()
    return q(found) if found else "kmskeys-resolver"


def install_fix(config: Path, prefix: str) -> str:
    """The install command that (re)writes the rule for `prefix` naming `config`."""
    return f"{resolver_command()} install --config {q(config)} --prefix {q(prefix)}"


def config_prefix(path: Path) -> str | None:
    """The prefix a config file serves (plain TOML reading, for suggestions only: the resolver's
    own check judges the file); None when it is missing or unreadable."""
    import tomllib

    try:
        value = tomllib.loads(path.read_text()).get("prefix", DEFAULT_PREFIX)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return value if isinstance(value, str) else None


def suggested_config(prefix: str) -> Path:
    """Where a new install for `prefix` should put its config: the default config, unless that
    one serves another prefix; then a config of the prefix's own, next to it."""
    if config_prefix(DEFAULT_CONFIG) in (None, prefix):
        return DEFAULT_CONFIG
    return DEFAULT_CONFIG.parent / prefix / "resolver.toml"


def new_rule_fix(asked: Path | None, prefix: str) -> str:
    """The install that adds a rule for `prefix`: with the config asked about, unless that one
    serves another prefix (install would refuse it)."""
    if asked is not None and config_prefix(asked) in (None, prefix):
        return install_fix(asked, prefix)
    return install_fix(suggested_config(prefix), prefix)


# --- keyctl and request-key --------------------------------------------------------------------


def check_keyctl() -> Iterator[Finding]:
    """keyctl(2) and request_key(2) usable at all (Docker's default seccomp blocks both)."""
    blocked = []
    try:
        keyutils.keyctl_get_keyring_ID(keyutils.KEY_SPEC_SESSION_KEYRING, False)
    except KeyctlError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            blocked.append(f"keyctl: {errno.errorcode[exc.errno]}")
    try:
        # A NULL callout never upcalls: ENOKEY when the syscall works.
        keyutils.request_key(b"user", b"kmskeys-doctor:probe", None, 0)
    except KeyctlError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            blocked.append(f"request_key: {errno.errorcode[exc.errno]}")
    if blocked:
        yield Finding(
            FAIL,
            "keyctl",
            f"the key system calls are blocked here ({', '.join(blocked)}): a seccomp filter "
            "such as Docker's default profile, which refuses keyctl, add_key and request_key; no "
            "secret can be fetched from this process (docs/containers.md)",
            "run the container with a seccomp profile that allows keyctl, add_key and "
            "request_key: docker run --security-opt seccomp=kmskeys-seccomp.json ... "
            "(docs/containers.md shows how to make it)",
        )
        return
    yield Finding(OK, "keyctl", "keyctl and request_key are allowed")


def check_request_key() -> Iterator[Finding]:
    """/sbin/request-key present: the kernel runs it for every miss."""
    if os.access(REQUEST_KEY, os.X_OK):
        yield Finding(OK, "request-key", f"{REQUEST_KEY} present")
        return
    manager = "apt-get" if shutil.which("apt-get") else "dnf" if shutil.which("dnf") else "yum"
    yield Finding(
        FAIL,
        "request-key",
        f"{REQUEST_KEY} missing: the kernel has nothing to run for a miss",
        f"{manager} install -y keyutils",
    )


@dataclass(frozen=True)
class Rule:
    """The installed rule for PREFIX:*: which program it runs, and with which config."""

    path: Path
    program: Path
    config: Path
    args: list[str]
    # kmskeys-gate and its settings from the config at install time, when the rule runs it
    # first (resolver/gate.c); the program and args are then the handler's, after its `--`.
    gate: Path | None = None
    gate_settings: list[str] | None = None


def parse_rule(path: Path, prefix: str) -> Rule | None:
    """The first `create user PREFIX:* *` line of `path`; None when it has none."""
    for line in path.read_text().splitlines():
        words = line.split()
        if words[:4] != ["create", "user", f"{prefix}:*", "*"] or len(words) < 5:
            continue
        program, args = Path(words[4]), words[5:]
        gate = settings = None
        if program.name == GATE_PROGRAM and "--" in args:
            split = args.index("--")
            gate, settings = program, args[: split - 2]  # before `%k %u --`
            if len(args) > split + 1:
                program, args = Path(args[split + 1]), args[split + 2 :]
        config = DEFAULT_CONFIG
        if args[:1] == ["handle"] and args[1:2] == ["--config"] and len(args) > 2:
            config = Path(args[2])
        return Rule(path, program, config, args, gate, settings)
    return None


def find_rule_file(prefix: str) -> Path:
    """The rule file for PREFIX: install's name for it, or another file of /etc/request-key.d
    with a `create user PREFIX:*` line (`install --rules both` puts the stored: prefix's rule in
    the kms prefix's file)."""
    path = REQUEST_KEY_D / rule_file_name(prefix)
    if path.exists():
        return path
    for other in sorted(REQUEST_KEY_D.glob("*.conf")):
        try:
            if parse_rule(other, prefix) is not None:
                return other
        except (OSError, UnicodeDecodeError):
            continue
    return path


def check_rule(prefix: str, asked: Path | None) -> tuple[list[Finding], Rule | None]:
    """Which rule routes PREFIX:* requests, which resolver it runs and which config it names."""
    path = find_rule_file(prefix)
    config = asked or suggested_config(prefix)
    try:
        st = path.lstat()
        rule = parse_rule(path, prefix)
    except FileNotFoundError:
        others = sorted(p.name for p in REQUEST_KEY_D.glob("kmskeys*.conf"))
        seen = f" (installed here: {', '.join(others)})" if others else ""
        return [
            Finding(
                FAIL,
                "rule",
                f"no rule {path}: requests for {prefix}:NAME never reach a resolver and fail "
                f"with ENOKEY, logged nowhere{seen}; if the app should use another prefix, give "
                "it that one (get_secret(..., prefix=P), kmskeys get --prefix P)",
                new_rule_fix(asked, prefix),
            )
        ], None
    except (OSError, UnicodeDecodeError) as exc:
        return [
            Finding(FAIL, "rule", f"cannot read {path} ({exc})", install_fix(config, prefix))
        ], None
    findings = []
    reason = unsafe_reason(st)
    if reason or stat.S_ISLNK(st.st_mode):
        findings.append(
            Finding(
                FAIL,
                "rule",
                f"{path} is {reason or 'a symbolic link'}: whoever can change it runs programs "
                "as root",
                f"chown root:root {q(path)} && chmod 644 {q(path)}",
            )
        )
    if rule is None:
        findings.append(
            Finding(FAIL, "rule", f"{path} has no rule for {prefix}:*", new_rule_fix(asked, prefix))
        )
        return findings, None
    if asked is not None and Path(os.path.abspath(asked)) != rule.config:
        findings.append(
            Finding(
                FAIL,
                "rule",
                f"the rule {path} names config {rule.config}, not {asked}: misses use "
                f"{rule.config}",
                install_fix(asked, prefix),
            )
        )
        return findings, rule
    if not os.access(rule.program, os.X_OK):
        findings.append(
            Finding(
                FAIL,
                "rule",
                f"{path} runs {rule.program}, which is missing: every miss fails with ENOKEY",
                install_fix(rule.config, prefix),
            )
        )
        return findings, rule
    if rule.args[:1] != ["handle"] or rule.args[3:] != RULE_MACROS:
        findings.append(
            Finding(
                WARN,
                "rule",
                f"{path} was written by an older install ({' '.join(rule.args[3:])}); a rule "
                "passing %c puts every inline blob in argv",
                install_fix(rule.config, prefix),
            )
        )
        return findings, rule
    findings.append(
        Finding(OK, "rule", f"rule {path} runs {rule.program} with config {rule.config}")
    )
    return findings, rule


def check_upcalls() -> Iterator[Finding]:
    """Whether a miss runs request-key here, for root and for a non-root requester (probed)."""
    if os.geteuid() != 0:
        yield Finding(
            INFO,
            "upcall",
            "upcall probe not run (its throwaway rule in /etc/request-key.d needs root): a miss "
            "that fails at once with ENOENT means request-key does not run for this user; run "
            "doctor as root to probe",
        )
        return
    try:
        caps = probe_upcalls()
    except (OSError, ValueError) as exc:
        yield Finding(
            WARN, "upcall", f"upcall probe could not run ({exc})", "kmskeys doctor (as root)"
        )
        return
    if not caps.root.works:
        yield Finding(
            FAIL,
            "upcall",
            f"a root request under a throwaway rule did not resolve, {caps.root}: no miss can "
            f"resolve here",
            f"keyctl request2 user debug:kmskeys-doctor x @s  # then check {REQUEST_KEY} runs",
        )
    elif not caps.non_root.works:
        yield Finding(
            WARN,
            "upcall",
            f"request-key does not run for non-root requesters here (uid {caps.uid}: "
            f"{caps.non_root}): misses of apps running as non-root never resolve; a property "
            "of this kernel, which no command changes: resolve their secrets as root on their "
            "behalf before each ttl ends (docs/reliability.md, hosts that refuse non-root "
            "upcalls)",
        )
    else:
        yield Finding(
            OK,
            "upcall",
            f"request-key runs for root and for a non-root requester (probed as uid {caps.uid})",
        )


# --- the resolver's own verdict ----------------------------------------------------------------


def run_check(program: Path, config: Path) -> dict[str, Any] | str:
    """`PROGRAM check --config CONFIG`'s report, or why there is none."""
    try:
        done = subprocess.run(
            [os.fspath(program), "check", "--config", os.fspath(config)],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{program} check could not run ({exc})"
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{program} check failed (exit {done.returncode}: {last})"
    return report


def _toml_line(config: Path, key: str) -> str | None:
    """The config's one line setting top-level `key`, when it holds the whole value."""
    try:
        lines = config.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        head = line.split("=", 1)[0].strip()
        if head == key and "=" in line:
            value = line.split("=", 1)[1]
            balanced = value.count("[") == value.count("]") and value.count("{") == value.count("}")
            return line if balanced and '"""' not in value and "'''" not in value else None
        if line.lstrip().startswith("["):
            break  # top-level keys come before the first table
    return None


def _config_fix(config: Path, key: str | None, known: Sequence[str]) -> str:
    """A paste-able edit for an invalid config: rename a misspelt key or comment out a bad one
    (its default then applies); otherwise open the file in an editor."""
    editor = f"${{EDITOR:-vi}} {q(config)}"
    if key is None or _toml_line(config, key) is None:
        return editor
    import difflib

    pattern = f"^[[:space:]]*{key}[[:space:]]*="
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        # Renaming onto a key the file already sets would make it a duplicate: comment out.
        if close and _toml_line(config, close[0]) is None:
            rename = f"s/^\\([[:space:]]*\\){key}\\([[:space:]]*=\\)/\\1{close[0]}\\2/"
            return f"sed -i '{rename}' {q(config)}"
    return f"sed -i 's/{pattern}/# &/' {q(config)}"


def check_config(report: dict[str, Any], prefix: str, routed: bool = True) -> Iterator[Finding]:
    """The config as the resolver loads it; `routed`: a rule for PREFIX names it."""
    config = Path(report["config_path"])
    found = report["config"]
    if found["ok"]:
        if not routed and prefix not in (found["prefix"], found["stored_prefix"]):
            yield Finding(
                INFO,
                "config",
                f"config {config} serves prefix {found['prefix']!r}, not {prefix!r}: a rule "
                f"for {prefix} needs a config of its own (the rule finding's fix makes one)",
            )
            return
        if prefix not in (found["prefix"], found["stored_prefix"]):
            yield Finding(
                FAIL,
                "config",
                f"config {config} serves prefix {found['prefix']!r}, but the rule routes "
                f"{prefix}:* to it: every request is refused",
                f"sed -i 's/^[[:space:]]*prefix[[:space:]]*=.*/prefix = \"{prefix}\"/' {q(config)}",
            )
            return
        yield Finding(
            OK, "config", f"config {config} is root-owned and safe, and the resolver loads it"
        )
        return
    where = Path(found.get("path") or config)
    problem = found["problem"]
    if problem == "missing":
        yield Finding(
            FAIL,
            "config",
            f"config {config} missing ({found['error']}): every request is refused",
            install_fix(config, prefix),
        )
    elif problem == "unsafe":
        mode = "755" if where != config else "644"
        yield Finding(
            FAIL,
            "config",
            f"config {config}: {found['error']}: every request is refused",
            f"chown root:root {q(where)} && chmod {mode} {q(where)}",
        )
    elif problem == "unreadable" and os.geteuid() != 0:
        yield Finding(
            INFO, "config", f"config {config} is not readable by this user; run doctor as root"
        )
    else:
        yield Finding(
            FAIL,
            "config",
            f"the resolver refuses its config: {found['error']}: every request is refused "
            "(docs/resolver.md lists every key)",
            _config_fix(config, found.get("key"), report.get("known_keys", [])),
        )


def check_gate(report: dict[str, Any], rule: Rule | None, prefix: str) -> Iterator[Finding]:
    """The gate on the rule line has the config's limits (install copies them there)."""
    wanted = report["config"].get("gate_settings")
    if rule is None or wanted is None:
        return
    if rule.gate is None:
        yield Finding(
            WARN,
            "rule",
            f"{rule.path} runs the handler without kmskeys-gate: one uid's flood of misses "
            "starts a Python process each (docs/resolver.md)",
            install_fix(rule.config, prefix),
        )
    elif rule.gate_settings != wanted:
        yield Finding(
            WARN,
            "rule",
            f"{rule.path} gives kmskeys-gate {' '.join(rule.gate_settings or [])}, the config "
            f"says {' '.join(wanted)} (state_dir, max_concurrent_per_uid, negative_ttl, "
            "syslog): install copies them into the rule",
            install_fix(rule.config, prefix),
        )


def check_dependencies(report: dict[str, Any], prefix: str) -> Iterator[Finding]:
    """The resolver the rule runs can import what a miss needs."""
    missing = report["dependencies"]
    program = Path(report["resolver"])
    if missing is None:
        yield Finding(OK, "dependencies", f"{program} imports botocore and cryptography")
        return
    import importlib.util

    mine = own_resolver()
    complete = all(importlib.util.find_spec(m) for m in ("botocore", "cryptography"))
    config = Path(report["config_path"])
    if mine is not None and complete and Path(os.path.abspath(mine)) != program:
        fix = f"{q(mine)} install --config {q(config)} --prefix {q(prefix)}"
    else:
        fix = f"{q(report['python'])} -m pip install 'kmskeys[resolver]'"
    yield Finding(
        FAIL,
        "dependencies",
        f"the resolver {program} lacks a dependency ({missing}): every miss fails with EAGAIN",
        fix,
    )


_BLOB_LEVELS = {"bad-name": WARN, "expired": WARN, "unreadable": INFO}


def _sanitized(name: str) -> str:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./@+-")
    out = "".join(ch if ch in allowed else "-" for ch in name).replace("..", "-")
    parts = [p for p in out.split("/") if p not in ("", ".")]
    out = "/".join(parts) or "secret"
    while out and not out[0].isalnum():
        out = out[1:]
    return out or "secret"


def _blob_fix(problem: dict[str, Any], config: Path, settings: dict[str, Any]) -> str:
    path = Path(problem["path"])
    kind = problem["problem"]
    if kind in ("unsafe",):
        return f"chown root:root {q(path)} && chmod 644 {q(path)}"
    if kind == "unsafe-dir":
        return f"chown root:root {q(path)} && chmod 755 {q(path)}"
    if kind == "symlink":
        return f'cp --remove-destination -- "$(readlink -f -- {q(path)})" {q(path)}'
    if kind == "bad-name":
        stem = path.name[: -len(contract.BLOB_SUFFIX)]
        return f"mv -- {q(path)} {q(path.with_name(_sanitized(stem) + contract.BLOB_SUFFIX))}"
    if kind == "key" and problem.get("key_arn"):
        arn = problem["key_arn"]
        if not settings["key_arns"] and not settings["discovery"]:
            return f"{resolver_command()} install --config {q(config)} --key-arn {q(arn)}"
        line = _toml_line(config, "key_arns")
        if line is not None and line.startswith("key_arns = ["):
            return f"sed -i 's|^key_arns = \\[|key_arns = [\"{arn}\", |' {q(config)}"
        return f"${{EDITOR:-vi}} {q(config)}"
    # unparseable, expired, not a regular file: set it aside (the handler reads NAME.kms only)
    # and deploy a new blob from the build side (kmskeys encrypt NAME).
    return f"mv -- {q(path)} {q(str(path) + '.broken')}"


def check_blobs(report: dict[str, Any]) -> Iterator[Finding]:
    """blob_dir and every NAME.kms below it, as the handler would read them."""
    blobs = report.get("blobs")
    if blobs is None:
        return
    config = report["config"]
    blob_dir = Path(config["blob_dir"])
    problem = blobs["problem"]
    if problem == "missing":
        yield Finding(
            WARN,
            "blob_dir",
            f"blob_dir {blob_dir} missing: only inline blobs can resolve",
            f"install -d -m 755 -o root -g root {q(blob_dir)}",
        )
        return
    if problem == "unsafe":
        yield Finding(
            FAIL,
            "blob_dir",
            f"blob_dir {blob_dir} is {blobs['error']}: every NAME.kms is refused",
            f"chown root:root {q(blob_dir)} && chmod 755 {q(blob_dir)}",
        )
        return
    if problem == "unreadable":
        yield Finding(
            INFO, "blob_dir", f"blob_dir {blob_dir} is not visible to this user; run doctor as root"
        )
        return
    failed = False
    for item in blobs["problems"]:
        level = _BLOB_LEVELS.get(item["problem"], FAIL)
        if level == INFO and os.geteuid() == 0:
            level = FAIL
        failed |= level in (WARN, FAIL)
        what = {
            "bad-name": "its name is not a valid secret name, so no request can load it",
            "expired": "requests for it are refused",
            "key": "the resolver refuses it",
            "unparseable": "not a blob the resolver can parse; redeploy it (kmskeys encrypt)",
        }.get(item["problem"], "the resolver refuses it")
        yield Finding(
            level,
            "blobs",
            f"{item['path']}: {item['error']}: {what}",
            None if level == INFO else _blob_fix(item, Path(report["config_path"]), config),
        )
    more = " (first files only)" if blobs["truncated"] else ""
    summary = "" if failed else f"; its {blobs['files']} blob file(s) parse{more}"
    yield Finding(OK, "blob_dir", f"blob_dir {blob_dir} is root-owned and safe{summary}")


def check_syslog(report: dict[str, Any]) -> Iterator[Finding]:
    """The handler's syslog socket: else its lines go to /dev/kmsg (dmesg, journalctl -k)."""
    config = report["config"]
    socket_path = Path(config["syslog_socket"])
    if listens(socket_path):
        yield Finding(OK, "syslog", f"the handler logs to syslog at {socket_path}")
        return
    path = Path(report["config_path"])
    if socket_path != DEV_LOG and listens(DEV_LOG):
        yield Finding(
            WARN,
            "syslog",
            f"syslog socket {socket_path} missing, but {DEV_LOG} is there: the handler's lines "
            "go to /dev/kmsg (dmesg, journalctl -k) instead of syslog",
            "sed -i 's|^[[:space:]]*syslog_socket[[:space:]]*=.*|syslog_socket = \"/dev/log\"|' "
            f"{q(path)}",
        )
    elif os.access(KMSG, os.W_OK) or (os.geteuid() != 0 and KMSG.exists()):
        yield Finding(
            INFO,
            "syslog",
            f"no syslog daemon at {socket_path}: the handler's lines go to /dev/kmsg, which "
            "dmesg and journalctl -k show (dmesg | grep kmskeys-resolver)",
        )
    else:
        yield Finding(
            WARN,
            "syslog",
            f"no syslog daemon at {socket_path} and no /dev/kmsg: the handler's lines are lost",
            "mknod -m 600 /dev/kmsg c 1 11",
        )


def listens(path: Path) -> bool:
    """Something receives on the unix datagram socket `path` (as the handler sends)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return False  # missing, not a socket, or nobody bound to it (ECONNREFUSED)
    return True


def check_warm_daemon(report: dict[str, Any]) -> Iterator[Finding]:
    """Whether misses go through the warm daemon or decrypt cold (bench/results.md: how long)."""
    value = report["config"]["warm_socket"]
    if value is None:
        yield Finding(
            INFO,
            "warm",
            "warm daemon off: each miss loads botocore; for faster misses set warm_socket and "
            "run kmskeys-resolver serve (docs/resolver.md)",
        )
        return
    path = Path(value)
    if os.geteuid() != 0:
        yield Finding(
            INFO, "warm", f"warm daemon at {path} answers root only; run doctor as root to check it"
        )
        return
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(1.0)
        try:
            conn.connect(os.fspath(path))
            uid = peer_uid(conn)
        except OSError as exc:
            start = (
                "systemctl enable --now kmskeys-resolver"
                if Path("/run/systemd/system").is_dir()
                else f"setsid {resolver_command()} serve --config {q(report['config_path'])} "
                "</dev/null >/dev/null 2>&1 &"
            )
            yield Finding(
                WARN,
                "warm",
                f"warm_socket {path} set but no daemon answers ({exc.strerror}): misses decrypt "
                "cold",
                start,
            )
            return
    if uid != 0:
        yield Finding(
            FAIL,
            "warm",
            f"warm_socket {path} is served by uid {uid}: the handler refuses it",
            f"fuser -k {q(path)}; rm -f {q(path)}",
        )
        return
    yield Finding(OK, "warm", f"warm daemon answering on {path}")


# --- this process's keyrings -------------------------------------------------------------------


def check_quota(uid: int) -> Iterator[Finding]:
    """This uid's kernel key quota headroom (/proc/key-users against maxkeys/maxbytes)."""
    try:
        lines = PROC_KEY_USERS.read_text().splitlines()
    except OSError as exc:
        yield Finding(
            WARN,
            "quota",
            f"cannot read {PROC_KEY_USERS} ({exc.strerror})",
            "mount -t proc proc /proc",
        )
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
            sysctl = "kernel.keys.root_max" if uid == 0 else "kernel.keys.max"
            yield Finding(
                WARN,
                "quota",
                f"uid {uid} uses {keys}/{max_keys} keys and {used}/{max_bytes} bytes of its key "
                "quota: new secrets will fail with EDQUOT",
                f"sysctl -w {sysctl}keys={max(2 * max_keys, 2 * keys)} "
                f"{sysctl}bytes={max(2 * max_bytes, 2 * used)}",
            )
        else:
            yield Finding(
                OK,
                "quota",
                f"uid {uid} key quota: {keys}/{max_keys} keys, {used}/{max_bytes} bytes",
            )
        return
    yield Finding(OK, "quota", f"uid {uid} holds no keys yet (quota untouched)")


def check_session_keyring(uid: int) -> Iterator[Finding]:
    """Which session keyring this process uses, who owns it and who shares the cached keys."""
    from kmskeys.key import Keyring

    try:
        desc = Keyring.session(create=False).describe()
    except KeyctlError:
        yield Finding(
            INFO,
            "session",
            "no session keyring yet: the first request creates one (the user session keyring); "
            "under systemd services get a private one (KeyringMode=private)",
        )
        return
    if desc.uid != uid:
        yield Finding(
            FAIL,
            "session",
            f"the session keyring {desc.description!r} is owned by uid {desc.uid}, not by uid "
            f"{uid}: its owner can read or plant what this process caches there (a joined "
            "or inherited session: su, runuser, keyctl session NAME)",
            # keyctl new_session cannot help: the kernel replaces a parent's session keyring
            # only when the caller's euid owns it (KEYCTL_SESSION_TO_PARENT).
            "exec keyctl session -  # a shell in a keyring of its own; a service: "
            "KeyringMode=private",
        )
    elif desc.description.startswith("_uid_ses."):
        yield Finding(
            INFO,
            "session",
            "session keyring is this user's default one: every process of the user shares the "
            "cache; under systemd, services get a private one (KeyringMode=private)",
        )
    elif desc.description == "_ses":
        yield Finding(
            INFO,
            "session",
            "session keyring is a private one (_ses): only this process tree shares the cache, "
            "e.g. a service under systemd KeyringMode=private and its CGI children",
        )
    else:
        yield Finding(
            INFO,
            "session",
            f"session keyring {desc.description!r}: processes that joined it share the cache",
        )


def check_negative_keys(prefix: str) -> Iterator[Finding]:
    """Cached failures: negative keys under PREFIX: that requests of this process still meet."""
    from kmskeys.cached import flush_command, negative_keys

    try:
        found = negative_keys(prefix)
    except OSError as exc:
        yield Finding(
            WARN, "cached", f"cannot read /proc/keys ({exc.strerror})", "mount -t proc proc /proc"
        )
        return
    for key in found:
        yield Finding(
            WARN,
            "cached",
            f"{key.description}: cached failure (negative key {key.serial}), expires "
            f"{key.expires}: requests fail at once, without asking the resolver, until then",
            flush_command(key.description),
        )
    if not found:
        yield Finding(OK, "cached", f"no cached failure under {prefix}: in this process's keyrings")


# --- IMDS ----------------------------------------------------------------------------------------


def _probe_as_nobody() -> list[imds.ProbeResult] | None:
    """IMDS as seen by uid nobody (root only)."""
    return imds.probe_as_user(*nobody(), 0.5)


def imds_findings(
    uid: int, mine: list[Any], as_nobody: list[imds.ProbeResult] | None
) -> Iterator[Finding]:
    """IMDS must be unreachable by app users: only root and the resolver may reach it."""
    reachable = [r for r in mine if r.reachable]
    fix = f"{resolver_command()} firewall apply"
    if uid != 0:
        if not reachable:
            shown = ", ".join(str(r) for r in mine)
            yield Finding(OK, "imds", f"IMDS not reachable by uid {uid} ({shown})")
        else:
            yield Finding(
                FAIL,
                "imds",
                f"IMDS reachable by uid {uid} ({reachable[0].endpoint}): this user can borrow the "
                "instance role and decrypt every blob of this host",
                fix + "  # as root",
            )
        return
    if not reachable:
        shown = ", ".join(str(r) for r in mine)
        yield Finding(
            INFO,
            "imds",
            f"IMDS not reachable even by root ({shown}): off EC2, credentials come from "
            "shared_credentials_file (docs/resolver.md, off EC2)",
        )
        return
    others = [r for r in as_nobody or [] if r.reachable]
    if as_nobody is None:
        yield Finding(WARN, "imds", "could not probe IMDS as uid nobody", "kmskeys doctor --json")
    elif others:
        yield Finding(
            FAIL,
            "imds",
            f"IMDS reachable by root and by uid nobody ({others[0].endpoint}): no firewall "
            "keeps app users off the instance role",
            fix,
        )
    else:
        yield Finding(
            OK,
            "imds",
            f"IMDS reachable by root ({reachable[0].endpoint}), as the resolver needs, and not "
            "by uid nobody",
        )


class _Background:
    """Run `work` in a thread now; `result()` waits for it (the IMDS probes wait on timeouts)."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self._value: Any = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], Any]) -> None:
        self._value = work()

    def result(self) -> Any:
        self._thread.join()
        return self._value


def findings(prefix: str, config: Path | None) -> Iterator[Finding]:
    """Every finding for PREFIX, in the order printed."""
    uid = os.getuid()
    imds_mine = _Background(lambda: imds.probe(0.5))
    imds_nobody = _Background(_probe_as_nobody) if os.geteuid() == 0 else None
    keyctl = list(check_keyctl())
    blocked = keyctl[0].level == FAIL
    rule_findings, rule = check_rule(prefix, config)
    config_path = Path(
        os.path.abspath(config or (rule.config if rule else suggested_config(prefix)))
    )
    runnable = rule is not None and os.access(rule.program, os.X_OK)
    program = rule.program if rule is not None and runnable else own_resolver()
    # The resolver's check (an interpreter start and its imports) runs while the probes do.
    check = _Background(lambda: run_check(program, config_path)) if program else None
    yield from keyctl
    yield from check_request_key()
    yield from rule_findings
    if not blocked:
        yield from check_upcalls()
    if check is None:
        yield Finding(
            WARN,
            "config",
            f"no kmskeys-resolver to check {config_path} with",
            f"{q(sys.executable)} -m pip install 'kmskeys[resolver]'",
        )
    else:
        report = check.result()
        if isinstance(report, str) and os.geteuid() != 0:
            yield Finding(
                INFO,
                "config",
                f"{report}: this user cannot run the resolver's check; run doctor as root",
            )
        elif isinstance(report, str):
            yield Finding(
                FAIL,
                "config",
                f"{report}: it cannot judge its config (an older kmskeys-resolver?)",
                install_fix(config_path, prefix),
            )
        else:
            yield from check_config(report, prefix, routed=rule is not None)
            yield from check_dependencies(report, prefix)
            if report["config"]["ok"]:
                yield from check_gate(report, rule, prefix)
                yield from check_blobs(report)
                yield from check_syslog(report)
                yield from check_warm_daemon(report)
    if not blocked:
        yield from check_session_keyring(uid)
        yield from check_negative_keys(prefix)
    yield from check_quota(uid)
    yield from imds_findings(uid, imds_mine.result(), imds_nobody.result() if imds_nobody else None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every check; exit 1 if any finding is a failure."""
    parser = argparse.ArgumentParser(prog="kmskeys doctor", description=__doc__)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="description namespace")
    parser.add_argument(
        "--config",
        type=Path,
        help="resolver config to check (default: the one the installed rule names)",
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = parser.parse_args(list(argv or []))
    from kmskeys.errors import InvalidNameError
    from kmskeys.names import validate_prefix

    try:
        validate_prefix(args.prefix)
    except InvalidNameError as exc:
        parser.error(str(exc))
    failed = False
    collected = []
    for finding in findings(args.prefix, args.config):
        failed |= finding.level == FAIL
        if args.json:
            collected.append(finding.as_dict())
        else:
            print(finding.line(), flush=True)
    if args.json:
        json.dump(
            {"ok": not failed, "prefix": args.prefix, "findings": collected}, sys.stdout, indent=2
        )
        sys.stdout.write("\n")
    return 1 if failed else 0
