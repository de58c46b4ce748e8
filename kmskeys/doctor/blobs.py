"""blob_dir and every NAME.kms below it, as the handler would read them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from kmskeys import contract
from kmskeys.checkreport import BlobProblem, BlobsMissing, CheckReport, ConfigLoaded
from kmskeys.doctor.config import _toml_line
from kmskeys.doctor.finding import FAIL, INFO, OK, WARN, Finding, q
from kmskeys.doctor.fixes import resolver_command

_BLOB_LEVELS = {"bad-name": WARN, "expired": WARN, "unreadable": INFO}


def _sanitized(name: str) -> str:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./@+-")
    out = "".join(ch if ch in allowed else "-" for ch in name).replace("..", "-")
    parts = [p for p in out.split("/") if p not in ("", ".")]
    out = "/".join(parts) or "secret"
    while out and not out[0].isalnum():
        out = out[1:]
    return out or "secret"


def _blob_fix(problem: BlobProblem, config: Path, settings: ConfigLoaded) -> str:
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
            return f"{resolver_command(config)} install --config {q(config)} --key-arn {q(arn)}"
        line = _toml_line(config, "key_arns")
        if line is not None and line.startswith("key_arns = ["):
            return f"sed -i 's|^key_arns = \\[|key_arns = [\"{arn}\", |' {q(config)}"
        return f"${{EDITOR:-vi}} {q(config)}"
    # unparseable, expired, not a regular file: set it aside (the handler reads NAME.kms only)
    # and deploy a new blob from the build side (kmskeys encrypt NAME).
    return f"mv -- {q(path)} {q(str(path) + '.broken')}"


def check_blobs(report: CheckReport, config: ConfigLoaded) -> Iterator[Finding]:
    """blob_dir and every NAME.kms below it, as the handler would read them."""
    blobs = report["blobs"]
    if blobs is None:
        return
    blob_dir = Path(config["blob_dir"])
    if blobs["problem"] is not None:
        yield from _blob_dir_problem(blobs, blob_dir)
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


def _blob_dir_problem(blobs: BlobsMissing, blob_dir: Path) -> Iterator[Finding]:
    if blobs["problem"] == "missing":
        yield Finding(
            WARN,
            "blob_dir",
            f"blob_dir {blob_dir} missing: only inline blobs can resolve",
            f"install -d -m 755 -o root -g root {q(blob_dir)}",
        )
    elif blobs["problem"] == "unsafe":
        yield Finding(
            FAIL,
            "blob_dir",
            f"blob_dir {blob_dir} is {blobs.get('error')}: every NAME.kms is refused",
            f"chown root:root {q(blob_dir)} && chmod 755 {q(blob_dir)}",
        )
    else:
        yield Finding(
            INFO, "blob_dir", f"blob_dir {blob_dir} is not visible to this user; run doctor as root"
        )
