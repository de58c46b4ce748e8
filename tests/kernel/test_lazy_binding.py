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


def test_a_cached_secret_in_a_new_process_loads_the_package_and_the_extension(
    session_keyring: Keyring,
) -> None:
    # A CGI process pays for every module it loads (docs/design.md, Budgets): `import kmskeys`
    # and a hit read the package and the hit-path extension, which checks the name, and nothing
    # else (no names module, no contract tables, no errors, no Key class, no __future__, no
    # typing).
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
    assert out.stdout.split() == ["kmskeys", "kmskeys._hitpath"]


@pytest.mark.parametrize("form", ["selector", "whole", "sm"])
def test_a_cached_secret_of_a_common_reference_loads_no_grammar(
    session_keyring: Keyring, form: str
) -> None:
    # `NAME#FIELD` of an operator's own prefix (the bench's), `PREFIX:NAME#FIELD`, and an `sm:`
    # field: the hit-path extension reads these shapes (kmskeys/_names.h); kmskeys/names.py,
    # the grammars (kmskeys/secretref.py, awsname.py, passname.py) and the error classes load
    # only for other shapes.
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
    assert out.stdout.split() == ["kmskeys", "kmskeys._hitpath"]


def test_the_extension_is_loaded_from_the_package_as_the_import_system_would() -> None:
    # kmskeys/__init__.py loads it by its file name, without the import system's search of the
    # package directory: the same file, the same module attributes, one module object.
    probe = (
        "import sys, kmskeys, importlib.machinery as m\n"
        "from kmskeys import _hitpath\n"
        "spec = _hitpath.__spec__\n"
        "print(sys.modules['kmskeys._hitpath'] is _hitpath is kmskeys._hitpath,\n"
        "      spec.name, type(spec.loader) is m.ExtensionFileLoader,\n"
        "      spec.origin == _hitpath.__file__ == kmskeys.__path__[0] + '/_hitpath.abi3.so',\n"
        "      _hitpath.__package__, m.PathFinder.find_spec('kmskeys._hitpath',\n"
        "      kmskeys.__path__).origin == spec.origin)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "kmskeys._hitpath", "True", "True", "kmskeys", "True"]


def test_a_name_the_extension_declines_loads_the_names_module_to_refuse_it() -> None:
    # A name that is not valid costs the import of kmskeys/names.py, which says what is wrong.
    probe = (
        "import sys, kmskeys\n"
        "try:\n"
        "    kmskeys.get_secret('../etc/passwd')\n"
        "except kmskeys.InvalidNameError as exc:\n"
        "    print('kmskeys.names' in sys.modules, 'segment' in str(exc) or '..' in str(exc))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
