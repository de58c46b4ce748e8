"""kmskeys.keyutils loads its cffi module only when a call needs it, and its kernel constants are
libkeyutils' own (they are written out so that `import kmskeys` need not load cffi): a CGI
process (examples/cgi) pays for every module it loads, and get_secret's hit path is
kmskeys/_hitpath.c."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kmskeys import Keyring, keyutils
from tests.support.names import unique, unique_prefix

pytestmark = pytest.mark.kernel

CONSTANTS = [
    "KEY_SPEC_THREAD_KEYRING",
    "KEY_SPEC_PROCESS_KEYRING",
    "KEY_SPEC_SESSION_KEYRING",
    "KEY_SPEC_USER_KEYRING",
    "KEY_SPEC_USER_SESSION_KEYRING",
    "KEY_SPEC_GROUP_KEYRING",
    "KEY_SPEC_REQKEY_AUTH_KEY",
]
# The process-wide calls' constants live beside those calls (kmskeys.lowlevel.process).
PROCESS_CONSTANTS = ["CLONE_NEWUSER", "CLONE_NEWNS"]


@pytest.mark.parametrize("name", CONSTANTS + PROCESS_CONSTANTS)
def test_the_written_out_constants_are_the_librarys(name: str) -> None:
    from kmskeys._keyutils_cffi import lib

    from kmskeys.lowlevel import process

    home = process if name in PROCESS_CONSTANTS else keyutils
    assert getattr(home, name) == getattr(lib, name)


def test_cffi_loads_on_the_first_call_that_needs_it() -> None:
    probe = (
        "import sys\n"
        "import kmskeys\n"
        "from kmskeys import keyutils\n"
        "before = '_cffi_backend' in sys.modules\n"
        "uid = keyutils.current_fsuid()\n"
        "print(before, '_cffi_backend' in sys.modules, type(keyutils.lib).__name__, uid >= 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "Lib", "True"]


def test_a_cached_secret_in_a_new_process_never_loads_cffi(session_keyring: Keyring) -> None:
    prefix = unique_prefix()
    session_keyring.add_key("user", f"{prefix}:cgi", b"kmst-cgi")
    probe = (
        "import sys, kmskeys\n"
        f"assert kmskeys.get_secret('cgi', prefix={prefix!r}) == b'kmst-cgi'\n"
        "print(sorted(m for m in sys.modules if 'cffi' in m))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_cached_secret_in_a_new_process_loads_two_modules_and_the_extension(
    session_keyring: Keyring,
) -> None:
    # A CGI process pays for every module it loads (docs/design.md, Budgets): `import kmskeys`
    # and a hit read the package, its names and the hit-path extension, and nothing else (no
    # contract tables, no errors, no Key class, no __future__, no typing).
    prefix = unique_prefix()
    session_keyring.add_key("user", f"{prefix}:cgi", b"kmst-cgi")
    probe = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import kmskeys\n"
        f"assert kmskeys.get_secret('cgi', prefix={prefix!r}) == b'kmst-cgi'\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["kmskeys", "kmskeys._hitpath", "kmskeys.names"]


@pytest.mark.parametrize("form", ["selector", "whole", "sm"])
def test_a_cached_secret_of_a_common_reference_loads_no_grammar(
    session_keyring: Keyring, form: str
) -> None:
    # `NAME#FIELD` of an operator's own prefix (the bench's), `PREFIX:NAME#FIELD`, and an `sm:`
    # field: kmskeys/names.py reads these shapes; the grammars (kmskeys/secretref.py,
    # awsname.py, passname.py) and the error classes load only for other shapes.
    prefix = unique_prefix()
    name = unique("ref")
    ref, asked = {
        "selector": (f"{name}#password", prefix),
        "whole": (f"{prefix}:{name}#password", "kms"),
        "sm": (f"{name}#password", "sm"),
    }[form]
    desc = f"{'sm' if form == 'sm' else prefix}:{name}#password"
    session_keyring.add_key("user", desc, b"kmst-ref")
    probe = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import kmskeys\n"
        f"assert kmskeys.get_secret({ref!r}, prefix={asked!r}) == b'kmst-ref'\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["kmskeys", "kmskeys._hitpath", "kmskeys.names"]
