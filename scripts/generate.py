"""Write what is generated from its one source (`make generate`; `--check` only compares).

- kmskeys/contract.h: the facts the C parts (resolver/gate.c, kmskeys/_hitpath.c, and the cffi
  module's helper) share with Python, from kmskeys/contract.py and the resolver's own facts, and
  the build stamp compiled into each of them;
- the BUILD_STAMP line of kmskeys/__init__.py, which each compiled part is checked against at
  import (the hit path, the binding) or run (the gate): a stale build never loads silently;
- the config table of docs/resolver.md, from the settings tables (resolver/config_text.py).

tests/unit/test_generated.py fails when any of them is stale. The stamp is the package version
and a digest of the header's facts and of the C sources, so that editing either makes every
compiled part stale until it is rebuilt (`make venv`).
"""

from __future__ import annotations

import errno
import hashlib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = REPO / "kmskeys" / "contract.h"
# The stamp's line is in the package's front door: `import kmskeys` checks the hit-path
# extension against it without loading contract.py.
STAMPED = REPO / "kmskeys" / "__init__.py"
DOCS = REPO / "docs" / "resolver.md"
# What the stamp covers besides the facts: every C source built into a compiled part.
C_SOURCES = (
    "resolver/gate.c",
    "resolver/gate.h",
    "resolver/gate_daemon.c",
    "resolver/gate_request.c",
    "resolver/gate_subuid.c",
    "kmskeys/_hitpath.c",
    "kmskeys/_hitpath_keys.h",
    "kmskeys/_names.h",
    "kmskeys/_build_keyutils.py",
    "bin/kmskeys.h",
    "bin/common.c",
    "bin/kmskeys.c",
    "bin/unprotect.c",
)
STAMP_LINE = re.compile(r'^BUILD_STAMP = "[^"]*"$', re.M)

try:
    import kmskeys
    from kmskeys import awsname, contract, names
    from kmskeys.flushepoch import FLUSH_DIR
    from resolver import config_text, limits, log, validators, wire
    from resolver.errors import UnavailableError
except ImportError as exc:  # the stamp check of a compiled part, most likely
    sys.exit(f"generate: {exc}\ngenerate: rebuild first (make venv), then run it again")


def _c_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def facts() -> list[tuple[str, str, str]]:
    """(name, C value, comment) of every shared fact, in the header's order."""
    unavailable = errno.errorcode[contract.ERRNO_UNAVAILABLE]
    return [
        ("USER_PAYLOAD_MAX", str(contract.USER_PAYLOAD_MAX), "a `user` key's payload, bytes"),
        ("DESCRIPTION_MAX", str(contract.DESCRIPTION_MAX), "a key description, bytes"),
        ("NAME_MAX", str(names.MAX_NAME_BYTES), "a secret's NAME, bytes (kmskeys/names.py)"),
        ("PREFIX_MAX", str(names.MAX_PREFIX_BYTES), "a description prefix, bytes"),
        *_prefix_facts(),
        ("ERRNO_UNKNOWN_SECRET", errno.errorcode[contract.ERRNO_UNKNOWN_SECRET], "no such secret"),
        ("ERRNO_REFUSED", errno.errorcode[contract.ERRNO_REFUSED], "refused"),
        ("ERRNO_UNAVAILABLE", unavailable, "temporarily unavailable: never cached"),
        ("ERRNO_UNAVAILABLE_NAME", _c_string(unavailable), "... as the log line names it"),
        ("OUTCOME_UNAVAILABLE", _c_string(UnavailableError.outcome), "the log line's outcome"),
        ("LOG_IDENT", _c_string(log.IDENT), "syslog ident of every line"),
        ("LOG_ERR", str(log.LOG_ERR), "syslog severity of the gate's lines"),
        ("LOG_FIELD_MAX", str(log.MAX_FIELD), "a log field is cut to this many characters"),
        ("LOG_SAFE", _c_string(log.SAFE_CHARS), "a field of these is bare"),
        ("SLOT_FD_ENV", _c_string(limits.SLOT_FD_ENV), "the gate passes its slot fd in this"),
        ("GATE_STAMP_ENV", _c_string(limits.GATE_STAMP_ENV), "... and its build stamp in this"),
        ("SLOT_PREFIX", _c_string(limits.SLOT_PREFIX), "state_dir/SLOT_PREFIX UID-INDEX"),
        ("MAX_SLOTS", str(validators.MAX_CONCURRENT), "max_concurrent_per_uid at most"),
        ("MAX_NEGATIVE_TTL", str(validators.MAX_NEGATIVE_TTL), "negative_ttl at most"),
        # What the gate gathers for the identification of a program-bound request
        # (docs/resolver.md, "Identifying the requester").
        ("PROC_KEYS_READER_ID", f"{contract.PROC_KEYS_READER_ID:#x}U", "reads /proc/keys as"),
        ("AUTH_LINES_MAX", str(contract.AUTH_LINES_MAX), "auth-key lines examined at most"),
        ("AUTH_LINE_MAX", str(contract.AUTH_LINE_MAX), "a longer line is not the kernel's"),
        *_daemon_facts(),
    ]


def _prefix_facts() -> list[tuple[str, str, str]]:
    """What kmskeys/_names.h needs to read a reference's common shapes (kmskeys/names.py)."""
    return [
        ("DEFAULT_PREFIX", _c_string(kmskeys.DEFAULT_PREFIX), "KMS-backed secrets' prefix"),
        ("SSM_PREFIX", _c_string(kmskeys.DEFAULT_SSM_PREFIX), "NAME#VERSION, NAME#LABEL"),
        ("TOKEN_PREFIX", _c_string(kmskeys.DEFAULT_TOKEN_PREFIX), "no selector"),
        ("PASS_PREFIX", _c_string(kmskeys.DEFAULT_PASS_PREFIX), "kmskeys/passname.py's"),
        ("STORED_PREFIX", _c_string(kmskeys.DEFAULT_STORED_PREFIX), "kmskeys/stored.py's"),
        ("FIELD_MAX", str(awsname.MAX_FIELD), "a Secrets Manager FIELD, bytes"),
        ("LABEL_MAX", str(awsname.MAX_LABEL), "a Parameter Store LABEL, bytes"),
    ]


def _daemon_facts() -> list[tuple[str, str, str]]:
    """The gate's share of the resolver daemon's wire (resolver/wire.py) and of the subuid rules
    (resolver/limits.py charged_uid)."""
    return [
        ("CALLOUT_MAX", str(contract.CALLOUT_MAX), "callout info, bytes"),
        ("ERRNO_QUOTA", "EDQUOT", "the requester's key quota is full"),
        ("LOG_WARNING", str(log.LOG_WARNING), "syslog severity of a warning"),
        ("DAEMON_WAIT_MAX_MS", str(int(validators.MAX_DAEMON_WAIT * 1000)), "daemon_wait at most"),
        ("SUBUID_FILE", _c_string(limits.SUBUID_FILE), "subordinate uid ranges"),
        ("USERS_FILE", _c_string(limits.USERS_FILE), "where range owners' names are looked up"),
        ("SUBUID_FILE_MAX", str(limits.SUBUID_FILE_MAX), "the subuid file, bytes at most"),
        ("SUBUID_OWNER_MAX", str(limits.SUBUID_OWNER_MAX), "a range owner's name, bytes"),
        ("SUBUID_WARNED", _c_string(limits.SUBUID_WARNED), "state_dir file: last subuid warning"),
        ("WIRE_MAGIC", _c_string(wire.MAGIC.decode()), "every daemon message starts so"),
        ("WIRE_VERSION", str(wire.VERSION), "... then this version"),
        ("WIRE_REQUEST", str(wire.REQUEST), "message type: gate to daemon"),
        ("WIRE_ACCEPTED", str(wire.ACCEPTED), "message type: daemon to gate"),
        ("WIRE_DECLINED", str(wire.DECLINED), "message type: daemon to gate"),
        ("WIRE_OUTCOME", str(wire.OUTCOME), "message type: daemon to gate"),
        ("WIRE_REPORT", str(wire.REPORT), "message type: gate to daemon"),
        ("WIRE_ABANDON", str(wire.ABANDON), "message type: gate to daemon"),
        ("WIRE_VIEW_ASK", str(wire.VIEW_ASK), "message type: daemon to gate"),
        ("WIRE_VIEW", str(wire.VIEW), "message type: gate to daemon"),
        ("WIRE_STAMP_MAX", str(wire.STAMP_MAX), "request: the gate's stamp, bytes"),
        ("WIRE_CONFIG_PATH_MAX", str(wire.CONFIG_PATH_MAX), "request: the rule's config path"),
        ("WIRE_PROC_KEYS_MAX", str(wire.PROC_KEYS_MAX), "view: those lines, bytes"),
        ("WIRE_PROC_KEYS_SCAN_MAX", str(wire.PROC_KEYS_SCAN_MAX), "/proc/keys read at most"),
        ("WIRE_FLAG_PROC_KEYS_CUT", str(wire.FLAG_PROC_KEYS_CUT), "... flag: it was cut"),
        ("WIRE_REQUEST_MAX", str(wire.REQUEST_MAX), "a request's body, bytes"),
        ("WIRE_VIEW_MAX", str(wire.VIEW_MAX), "a view's body, bytes"),
        ("WIRE_OUTCOME_FIXED", str(wire.OUTCOME_FIXED.size), "an outcome's fixed fields"),
        ("WIRE_OUTCOME_MAX", str(wire.OUTCOME_MAX), "an outcome's body, bytes"),
        ("WIRE_OUTCOME_WAIT_MAX_MS", str(wire.OUTCOME_WAIT_MAX_MS), "outcome wait at most"),
        ("WIRE_TIMEOUT_MAX", str(wire.TIMEOUT_MAX), "an answered key's timeout at most"),
        ("ANSWER_PERM_ALLOWED", f"0x{wire.ANSWER_PERM_ALLOWED:08x}U", "an answer's mask within"),
        ("NEGATIVE_PERM_ALLOWED", f"0x{wire.NEGATIVE_PERM_ALLOWED:08x}U", "a refusal's within"),
        ("WIRE_REPORT_SIZE", str(wire.REPORT_BODY.size), "a report's body, bytes"),
        ("WIRE_REPORT_WAIT_MS", str(wire.REPORT_WAIT_MS), "time to hand over a report"),
        ("WIRE_STEP_NONE", str(wire.STEP_NONE), "report: nothing failed"),
        ("WIRE_STEP_CHOWN", str(wire.STEP_CHOWN), "report: chown failed"),
        ("WIRE_STEP_SETPERM", str(wire.STEP_SETPERM), "report: setperm failed"),
        ("WIRE_STEP_TIMEOUT", str(wire.STEP_TIMEOUT), "report: set_timeout failed"),
        ("WIRE_STEP_INSTANTIATE", str(wire.STEP_INSTANTIATE), "report: instantiate failed"),
        ("WIRE_STEP_FLUSHED", str(wire.STEP_FLUSHED), "report: flushed, rejected EAGAIN"),
        ("WIRE_TOKEN_ABSENT", f"0x{wire.TOKEN_ABSENT:08x}U", "outcome: no such token file"),
        ("WIRE_TOKEN_FILES_MAX", str(wire.TOKEN_FILES_MAX), "outcome: flush tokens at most"),
        ("WIRE_TOKEN_FILE_NAME_MAX", str(wire.TOKEN_FILE_NAME_MAX), "... a file's name, bytes"),
        ("WIRE_TOKEN_MAX", str(wire.TOKEN_MAX), "... its content, bytes"),
        ("WIRE_FLUSH_DIR", _c_string(FLUSH_DIR), "state_dir's flush tokens' directory"),
    ]


def stamp() -> str:
    """The package version and a digest of the facts and the C sources."""
    digest = hashlib.sha256()
    for name, value, _ in facts():
        digest.update(f"{name}={value}\n".encode())
    for source in C_SOURCES:
        digest.update((REPO / source).read_bytes())
    return f"{kmskeys.__version__}+{digest.hexdigest()[:12]}"


def header(build_stamp: str) -> str:
    """kmskeys/contract.h."""
    lines = [
        "/* kmskeys/contract.h: generated by scripts/generate.py (make generate) from",
        " * kmskeys/contract.py and the resolver's facts. Do not edit: a unit test fails when it",
        " * is stale (tests/unit/test_generated.py). Included by resolver/gate.c,",
        " * kmskeys/_hitpath.c and the `kmskeys` programs (bin/kmskeys.h); the cffi module",
        " * (kmskeys/_build_keyutils.py) compiles the stamp in.",
        " */",
        "#ifndef KMSKEYS_CONTRACT_H",
        "#define KMSKEYS_CONTRACT_H",
        "",
        "/* Each compiled part carries it; checked against kmskeys.BUILD_STAMP. */",
        f"#define KMSKEYS_BUILD_STAMP {_c_string(build_stamp)}",
        "",
    ]
    for name, value, comment in facts():
        lines.append(f"/* {comment} */")
        lines.append(f"#define KMSKEYS_{name} {value}")
    lines += ["", "#endif", ""]
    return "\n".join(lines)


def outputs() -> dict[Path, str]:
    """Each generated file's path and the text it must have."""
    build_stamp = stamp()
    stamped_text = STAMPED.read_text()
    if not STAMP_LINE.search(stamped_text):
        raise SystemExit(f"generate: {STAMPED} has no BUILD_STAMP line")
    return {
        HEADER: header(build_stamp),
        STAMPED: STAMP_LINE.sub(f'BUILD_STAMP = "{build_stamp}"', stamped_text),
        DOCS: config_text.replace_docs_table(DOCS.read_text()),
    }


def stale() -> list[Path]:
    """The generated files whose text is not what it must be."""
    return [
        path for path, text in outputs().items() if not path.exists() or path.read_text() != text
    ]


def main(argv: list[str]) -> int:
    """Write the stale files, or with --check list them and fail."""
    if argv == ["--check"]:
        found = stale()
        for path in found:
            print(f"stale: {path.relative_to(REPO)} (run make generate)", file=sys.stderr)
        return 1 if found else 0
    for path, text in outputs().items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
