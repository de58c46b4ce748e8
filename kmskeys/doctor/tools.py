"""The programs the pass: and token: backends run, when a rule routes their prefix: gpg (the
resolver decrypts a user's password-store entry with it, as that user) and the PKCS#11 module
(docs/tokens.md)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from kmskeys.checkreport import ConfigLoaded
from kmskeys.doctor.finding import FAIL, OK, Finding, q


def check_tools(config: ConfigLoaded, config_path: Path, routed: set[str]) -> Iterator[Finding]:
    """gpg for pass:, the PKCS#11 module for token:, each when its prefix is routed."""
    tools = config.get("tools")
    if tools is None:
        return
    wanted = [
        ("pass", config.get("pass_prefix"), tools.get("gpg")),
        ("token", config.get("token_prefix"), tools.get("pkcs11")),
    ]
    for backend, prefix, tool in wanted:
        if prefix is None or prefix not in routed or tool is None:
            continue
        path = tool["path"]
        if tool["ok"]:
            yield Finding(OK, "tools", f"{prefix}: runs {path}, which is there")
        elif backend == "pass":
            yield Finding(
                FAIL,
                "tools",
                f"{prefix}:* is routed, but {path} is missing: every pass: request fails",
                f"{_installer()} install -y gnupg",
            )
        else:
            what = "token_module is not set" if path is None else f"token_module {path} is missing"
            yield Finding(
                FAIL,
                "tools",
                f"{prefix}:* is routed, but {what}: every token: request fails (docs/tokens.md)",
                f"{_installer()} install -y softhsm2  # or your token's module; then set "
                f"token_module in {q(config_path)}",
            )


def _installer() -> str:
    return "apt-get" if shutil.which("apt-get") else "dnf" if shutil.which("dnf") else "yum"
