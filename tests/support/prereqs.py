"""What each test tier needs from the machine. A missing prerequisite fails the tier, loudly.

CI runs as root, so every tier must run there: nothing here ever skips.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from tests.support import requester

REQUEST_KEY = Path("/sbin/request-key")
REQUEST_KEY_D = Path("/etc/request-key.d")


def _root() -> list[str]:
    return [] if os.geteuid() == 0 else ["root (run the suite as root, as CI does)"]


def _binaries(*names: str) -> list[str]:
    return [f"the '{n}' command" for n in names if shutil.which(n) is None]


def _kernel() -> list[str]:
    try:
        from kmskeys import keyutils

        # The user keyring always exists; creating a thread or process keyring here would
        # become request_key's default destination for the rest of the run.
        keyutils.keyctl_get_keyring_ID(keyutils.KEY_SPEC_USER_KEYRING, True)
    except Exception as exc:
        return [f"a working keyctl (libkeyutils binding failed: {exc})"]
    return []


def _upcall() -> list[str]:
    missing = _root() + _kernel()
    if not REQUEST_KEY.exists():
        missing.append(f"{REQUEST_KEY} (apt-get install keyutils)")
    if not REQUEST_KEY_D.is_dir():
        missing.append(f"{REQUEST_KEY_D}/ (apt-get install keyutils)")
    if importlib.util.find_spec("moto") is None:
        missing.append("moto[server] in the venv (pip install -e '.[dev]')")
    if not missing:
        # Presence is not capability: the session probe made a root request through a rule.
        caps = requester.capabilities()
        if not isinstance(caps, requester.UpcallCapabilities):
            missing.append(f"the upcall probe ({caps})")
        elif not caps.root.works:
            missing.append(f"a root requester whose miss runs {REQUEST_KEY} ({caps.root})")
    return missing


def _non_root_upcall() -> list[str]:
    """Tiers whose requesters are other users: one kind of requester must upcall here."""
    return _upcall() or requester.missing()


def _netns() -> list[str]:
    return _root() + _binaries("ip", "nft", "iptables", "ip6tables")


def _terraform() -> list[str]:
    missing = [] if importlib.util.find_spec("hcl2") else ["python-hcl2 (pip install -e '.[dev]')"]
    # checkov lives in its own venv (mk/terraform.mk) so its pins never fight the dev deps.
    if not (Path(__file__).resolve().parents[2] / ".venv-checkov/bin/checkov").exists():
        missing.append("checkov in .venv-checkov (make .venv-checkov/.installed)")
    return missing


def _examples() -> list[str]:
    return _upcall() + _binaries("lighttpd")


def _tokens() -> list[str]:
    from tests.support import passgpg, softhsm

    return passgpg.missing() + softhsm.missing()


CHECKS = {
    "kernel": _kernel,
    "upcall": _upcall,
    "faults": _upcall,
    "isolation": _non_root_upcall,
    "soak": _non_root_upcall,
    "netns": _netns,
    "terraform": _terraform,
    "examples": _examples,
    "tokens": _tokens,
}


def missing_for(tier: str) -> list[str]:
    """What this machine lacks for `tier` (empty when it can run)."""
    check = CHECKS.get(tier)
    return check() if check else []
