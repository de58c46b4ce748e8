"""A SoftHSM2 token for a test: initialised by the test in its own directory, removed after.

SoftHSM2 (Debian's softhsm2) is a real PKCS#11 module, the usual stand-in for a YubiKey or an
HSM. `softhsm_token(base)` writes a softhsm2.conf whose token directory is below `base`,
initialises a token with `softhsm2-util --init-token` (a random label, user PIN and SO PIN) and
generates the seal key pair on it: RSA 2048, the private half sensitive and never extractable,
the public half readable without login. SoftHSM reads SOFTHSM2_CONF once, at C_Initialize, so
code that opens the token runs in a child process with `token.env()` (`run_child`).

`system_token()` makes the same token in SoftHSM's own configuration (Debian's
/etc/softhsm/softhsm2.conf, tokens below /var/lib/softhsm/tokens): the one a resolver run by
request-key sees, since the kernel starts it with no SOFTHSM2_CONF. Its label is unique; the
token (its directory) is deleted afterwards, even on failure, and nothing else there is touched.
`remove()` deletes it early: a token pulled out of its slot.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

from tests.support.names import TEST_TAG

MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so",)
SYSTEM_CONF = Path("/etc/softhsm/softhsm2.conf")
KEY_LABEL = "kmskeys-seal"
TIMEOUT = 120
REPO = Path(__file__).resolve().parents[2]


def module_path() -> str | None:
    """SoftHSM2's PKCS#11 module on this machine, if installed."""
    return next((p for p in MODULE_CANDIDATES if Path(p).exists()), None)


def missing() -> list[str]:
    """What this machine lacks for the token tests."""
    lacking = []
    if shutil.which("softhsm2-util") is None or module_path() is None:
        lacking.append("SoftHSM2 (apt-get install softhsm2)")
    if find_spec("pkcs11") is None:
        lacking.append("python-pkcs11 in the venv (pip install -e '.[dev]')")
    return lacking


class Token:
    """One initialised SoftHSM2 token and what it takes to open it."""

    def __init__(
        self, directory: Path, label: str, user_pin: str, so_pin: str, *, system: bool = False
    ) -> None:
        self.directory = directory
        self.system = system
        self.conf = SYSTEM_CONF if system else directory / "softhsm2.conf"
        self.label = label
        self.user_pin = user_pin
        self.so_pin = so_pin
        self.module = module_path() or MODULE_CANDIDATES[0]
        self.key_label = KEY_LABEL

    def env(self) -> dict[str, str]:
        """The environment a process needs to see this token (and no other)."""
        if self.system:
            return {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def remove(self) -> None:
        """Delete the token (its slot is empty afterwards); idempotent."""
        subprocess.run(
            ["softhsm2-util", "--delete-token", "--token", self.label], env=self.env(),
            capture_output=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip

    def util(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run softhsm2-util against this token's configuration."""
        return subprocess.run(
            ["softhsm2-util", *args], env=self.env(), capture_output=True, text=True,
            timeout=TIMEOUT, check=True,
        )  # fmt: skip

    def write_pin(self, path: Path, pin: str | None = None, mode: int = 0o600) -> Path:
        """A PIN file (root's, `mode`) holding the user PIN or `pin`."""
        path.write_text((pin if pin is not None else self.user_pin) + "\n")
        path.chmod(mode)
        return path


def run_child(code: str, env: dict[str, str], payload: object = None) -> dict[str, object]:
    """Run `code` in a fresh interpreter (fresh C_Initialize) with `payload` as JSON on stdin.

    The code defines `main(payload) -> JSON-able`; the child prints {"ok": result} or
    {"error": class name, "errno": ..., "message": ..., "reason": ...}.
    """
    wrapper = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"{code}\n"
        "payload = json.loads(sys.stdin.read())\n"
        "try:\n"
        "    print(json.dumps({'ok': main(payload)}))\n"
        "except BaseException as exc:\n"
        "    print(json.dumps({'error': type(exc).__name__, 'errno': getattr(exc,"
        " 'answer_errno', None), 'message': str(exc), 'repr': repr(exc),"
        " 'context': repr(exc.__context__) if not exc.__suppress_context__ else None}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper], input=json.dumps(payload), capture_output=True,
        text=True, env=env, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    if not done.stdout.strip():
        raise RuntimeError(f"child died ({done.returncode}): {done.stderr}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


_KEYGEN = """
def main(p):
    import pkcs11
    from pkcs11 import Attribute, KeyType
    lib = pkcs11.lib(p["module"])
    token = lib.get_token(token_label=p["label"])
    with token.open(rw=True, user_pin=p["initial"]) as session:
        # The PIN softhsm2-util saw in its argv is thrown away at once.
        session.set_pin(p["initial"], p["pin"])
        session.generate_keypair(
            KeyType.RSA, 2048, label=p["key"], store=True,
            public_template={Attribute.ENCRYPT: True, Attribute.WRAP: True},
            private_template={Attribute.DECRYPT: True, Attribute.UNWRAP: True,
                              Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )
    return True
"""


@contextmanager
def softhsm_token(base: Path) -> Iterator[Token]:
    """An initialised token with the seal key pair, in `base/softhsm`; removed after."""
    directory = base / f"softhsm-{secrets.token_hex(3)}"
    (directory / "tokens").mkdir(parents=True, mode=0o700)
    token = _new_token(directory)
    token.conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\n"
        "objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    try:
        _initialise(token)
        yield token
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def refresh_in_process(module: str) -> None:
    """Let this process's SoftHSM see the tokens there are now: SoftHSM reads its token
    directory at C_Initialize, so a process that initialised it before a token was made (an
    earlier test's) finalises and initialises it again. A resolver handler is a new process
    for every miss and never needs this."""
    import pkcs11

    lib = pkcs11.lib(module)
    if lib.initialized:
        lib.reinitialize()


@contextmanager
def system_token() -> Iterator[Token]:
    """An initialised token with the seal key pair in SoftHSM's own configuration; deleted
    after (see the module docstring)."""
    if not SYSTEM_CONF.exists():
        raise RuntimeError(f"{SYSTEM_CONF} is missing (apt-get install softhsm2)")
    token = _new_token(Path("/nonexistent"), system=True)
    try:
        _initialise(token)
        yield token
    finally:
        token.remove()


def _new_token(directory: Path, *, system: bool = False) -> Token:
    return Token(
        directory,
        label=f"{TEST_TAG}-{secrets.token_hex(3)}",
        user_pin=secrets.token_hex(4),
        so_pin=secrets.token_hex(4),
        system=system,
    )


def _initialise(token: Token) -> None:
    """`softhsm2-util --init-token`, a PIN of its own (not the one in argv), the key pair."""
    initial = secrets.token_hex(4)
    token.util(
        "--init-token", "--free", "--label", token.label,
        "--pin", initial, "--so-pin", token.so_pin,
    )  # fmt: skip
    made = run_child(
        _KEYGEN,
        token.env(),
        {"module": token.module, "label": token.label, "initial": initial,
         "pin": token.user_pin, "key": token.key_label},
    )  # fmt: skip
    if made.get("ok") is not True:
        raise RuntimeError(f"key generation on the token failed: {made}")
