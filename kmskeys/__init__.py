"""kmskeys: DPAPI for Linux fleets.

Secrets encrypted with AWS KMS at build time are resolved once per host by a root request-key
handler and served from the kernel key retention service. This package is the app client: it
needs only cffi and libkeyutils, and never imports boto3.

The top level is the safe tier: `get_secret`, `Key` and `Keyring` return a payload only from a
key this process's fsuid owns. `kmskeys.lowlevel` is the low-level tier, for the resolver side:
unchecked request and read, and the calls that answer, re-own and re-permission keys.
"""

# `import kmskeys` and a cached get_secret read this file and the hit-path extension, nothing
# else: every module a fresh process loads costs it about 0.1 ms (a CGI request lives 20 ms;
# tests/bench/cgi.py). So neither `from __future__ import annotations` (every annotation here
# is valid at run time) nor `typing`; a name, or a reference of a common shape such as
# `sm:prod/db#password`, is checked in C (kmskeys/_names.h), and kmskeys/names.py and
# secretref.py load only to say what is wrong or to read another shape. The facts the hot path
# needs are the package's own: kmskeys/contract.py re-exports them beside the other facts, whose
# tables cost a fresh process more than all of this.
__version__ = "0.1.0"
# The stamp of the sources the compiled parts were built from (kmskeys/contract.h), written by
# scripts/generate.py: never edit by hand. Checked below against the hit-path extension's.
BUILD_STAMP = "0.1.0+6bf180430451"
# The description namespace of KMS-backed secrets: keys are described `kms:NAME`.
DEFAULT_PREFIX = "kms"
# The namespace of keys kept in the host's own keystore (the essay's `stored:NAME`; docs/dpapi.md).
DEFAULT_STORED_PREFIX = "stored"
# The namespaces of a user's own password-store entries (`pass:NAME[#all|#field=KEY]`,
# kmskeys/passname.py) and of blobs a PKCS#11 token opens (`token:NAME`, kmskeys/tokenblob.py).
DEFAULT_PASS_PREFIX = "pass"  # noqa: S105 - a prefix, not a password
DEFAULT_TOKEN_PREFIX = "token"  # noqa: S105 - a prefix
# The namespaces of secrets the resolver reads where AWS users keep them: Secrets Manager
# (`sm:NAME[#FIELD][#stage=LABEL|#version=ID]`) and Parameter Store (`ssm:NAME[#VERSION|#LABEL]`);
# the grammar is kmskeys/awsname.py, the backends resolver/secretsmanager.py and
# resolver/parameterstore.py.
DEFAULT_SM_PREFIX = "sm"
DEFAULT_SSM_PREFIX = "ssm"

TYPE_CHECKING = False  # not `from typing import`: typing costs milliseconds to import

if TYPE_CHECKING:
    from types import ModuleType

    from kmskeys.dpapi import protect, protect_bytes, unprotect, unprotect_with_description
    from kmskeys.errors import (
        InvalidArgumentError,
        InvalidNameError,
        KeyctlError,
        KeyExpiredError,
        KeyNotFoundError,
        KeyOwnershipError,
        KeyPermissionError,
        KeyRejectedError,
        KeyRevokedError,
        KeyTypeUnavailableError,
        KmsKeysError,
        NotAProtectBlobError,
        OperationNotPermittedError,
        OutOfMemoryError,
        PayloadTooLargeError,
        ProtectAuthenticationError,
        ProtectError,
        QuotaExceededError,
        ScopeNotAllowedError,
        TemporarilyUnavailableError,
        TruncatedProtectBlobError,
        UnknownKeyVersionError,
        WrongUserError,
    )
    from kmskeys.key import Key, Keyring
    from kmskeys.keydesc import KeyDescription
    from kmskeys.names import description, validate_name


def _load_hitpath() -> "ModuleType":
    # The hit-path extension, from this package's directory, as importlib.util's recipe for
    # importing a given file does (a spec with its location, module_from_spec, exec_module):
    # the import system would first list the directory to find it, which costs a fresh process
    # 0.1 ms. The two modules are the import system's own, always loaded (importlib.util and
    # importlib.machinery re-export what is used here; importing them would cost more than this
    # saves). The name is the one setup.py builds (a limited-API extension: `.abi3.so`); without
    # that file, the import system finds what there is.
    import _frozen_importlib as bootstrap
    import _frozen_importlib_external as external
    import sys

    name = "kmskeys._hitpath"
    path = f"{__path__[0]}/_hitpath.abi3.so"
    loader = external.ExtensionFileLoader(name, path)
    spec = bootstrap.ModuleSpec(name, loader, origin=path)
    spec.has_location = True  # __file__ is its path
    try:
        module = bootstrap.module_from_spec(spec)
    except ImportError:
        from kmskeys import _hitpath

        return _hitpath
    sys.modules[name] = module
    loader.exec_module(module)
    return module


if TYPE_CHECKING:
    from kmskeys import _hitpath
else:
    _hitpath = _load_hitpath()


def _verify_stamp(module: str, stamp: str) -> None:
    # pyca/cryptography's _verify_package_version: a compiled part built from other sources
    # than this Python (a stale editable install, a half-copied tree) never loads silently.
    if stamp != BUILD_STAMP:
        raise ImportError(
            f"kmskeys.{module} was built from other sources (build stamp {stamp!r}, this "
            f"kmskeys is {BUILD_STAMP!r}): reinstall kmskeys (pip install --force-reinstall, "
            "or make venv in a checkout)"
        )


# The hit-path extension is loaded by every `import kmskeys`: checked here. The cffi module is
# loaded on first use (kmskeys/keyutils.py), and checked then.
_verify_stamp("_hitpath", _hitpath.BUILD_STAMP)


def __getattr__(name: str) -> object:
    # What a hit never needs loads on first use (an error class usually inside an `except`
    # clause, which is evaluated only when an exception propagates): `import kmskeys` and
    # get_secret read this file, kmskeys/names.py and the hit-path extension, nothing else.
    if name in _ERRORS:
        from kmskeys import errors

        return getattr(errors, name)
    if name in ("Key", "Keyring"):
        from kmskeys import key

        return getattr(key, name)
    if name == "KeyDescription":
        from kmskeys.keydesc import KeyDescription

        return KeyDescription
    if name in ("description", "validate_name"):
        from kmskeys import names

        return getattr(names, name)
    if name in _DPAPI:
        # DPAPI needs `cryptography`: loaded on the first protect/unprotect, never on import.
        from kmskeys import dpapi

        return getattr(dpapi, name)
    raise AttributeError(f"module 'kmskeys' has no attribute {name!r}")


__all__ = [
    "InvalidArgumentError",
    "InvalidNameError",
    "Key",
    "KeyDescription",
    "KeyExpiredError",
    "KeyNotFoundError",
    "KeyOwnershipError",
    "KeyPermissionError",
    "KeyRejectedError",
    "KeyRevokedError",
    "KeyTypeUnavailableError",
    "KeyctlError",
    "Keyring",
    "KmsKeysError",
    "NotAProtectBlobError",
    "OperationNotPermittedError",
    "OutOfMemoryError",
    "PayloadTooLargeError",
    "ProtectAuthenticationError",
    "ProtectError",
    "QuotaExceededError",
    "ScopeNotAllowedError",
    "TemporarilyUnavailableError",
    "TruncatedProtectBlobError",
    "UnknownKeyVersionError",
    "WrongUserError",
    "description",
    "get_secret",
    "protect",
    "protect_bytes",
    "unprotect",
    "unprotect_with_description",
    "validate_name",
]

# Every exported name ending in "Error" lives in kmskeys.errors and is loaded by __getattr__.
_ERRORS = frozenset(name for name in __all__ if name.endswith("Error"))
_DPAPI = frozenset(("protect", "protect_bytes", "unprotect", "unprotect_with_description"))


# get_secret is the client's hot path, so it lives in the front door itself: every module file
# a fresh process reads costs it about 0.1 ms (a CGI process lives 20 ms; tests/bench/cgi.py).
# Where it caches: None (request_key's default, the session keyring), "session", or a keyring
# every process of the uid shares ("user", "persistent"). A shared keyring is linked into this
# process's own keyring (private: children do not inherit it) so that request_key searches it
# and the resolver possesses the key it constructs there: the kernel gives the handler
# possession only through the requester's thread, process and session keyrings, and an
# anonymous session keyring does not link the user keyring.
KEYRINGS = ("session", "user", "persistent")
# include/uapi/linux/keyctl.h (kmskeys/keyutils.py has them all; tests/unit holds them to
# libkeyutils' own).
_KEY_SPEC_PROCESS_KEYRING = -2
_KEY_SPEC_SESSION_KEYRING = -3
_DESCRIPTIONS: dict[tuple[object, str], bytes] = {}
# (name, prefix, keyring) -> the serial get_secret last found for them (see get_secret).
_SERIALS: "dict[tuple[object, str, object], int]" = {}  # quoted: nothing to evaluate
_SHARED: dict[str, int] = {}
# The C calls of the hit paths (kmskeys/_hitpath.c), bound once.
_fetch = _hitpath.fetch
_read_recent = _hitpath.read_recent
_common_description = _hitpath.describe


def _describe(name: str | bytes, prefix: str) -> bytes:
    """`PREFIX:NAME`, or the description a reference names: a selector (`pass:NAME#all`,
    `sm:NAME#password`) or a prefix of its own (`sm:prod/db#password`). A valid name or a
    reference of a common shape is read in C (kmskeys/_names.h), to the same description;
    kmskeys/secretref.py reads every other, and refuses what is not valid, saying why."""
    desc = _common_description(name, prefix)
    if desc is None:
        from kmskeys.secretref import described

        return described(name, prefix).encode()
    return desc


def _forget_shared() -> None:
    _SHARED.clear()  # a forked child has no process keyring: link again when asked


def _shared(kind: str) -> int:
    ring = _SHARED.get(kind)
    if ring is None:
        from kmskeys import keyutils

        if not _SHARED:
            import os

            os.register_at_fork(after_in_child=_forget_shared)
        process = _KEY_SPEC_PROCESS_KEYRING
        if kind == "user":
            ring = keyutils.keyctl_get_keyring_ID(keyutils.KEY_SPEC_USER_KEYRING, True)
            keyutils.keyctl_link(ring, process)  # creates the process keyring
        else:
            # Also resets its expiry timer (kernel.keys.persistent_keyring_expiry).
            ring = keyutils.keyctl_get_persistent(-1, process)
        _SHARED[kind] = ring
    return ring


def _destination(keyring: "str | Key | int | None") -> int:
    if keyring is None:
        # With a process keyring of ours, the kernel's default would be it: keep the session's.
        return _KEY_SPEC_SESSION_KEYRING if _SHARED else 0
    if keyring == "session":
        return _KEY_SPEC_SESSION_KEYRING
    if keyring in ("user", "persistent"):
        return _shared(str(keyring))
    if isinstance(keyring, int) and not isinstance(keyring, bool):
        return keyring
    from kmskeys.key import Key

    if isinstance(keyring, Key):
        return keyring.serial
    from kmskeys.errors import InvalidArgumentError

    raise InvalidArgumentError(f"keyring must be one of {', '.join(KEYRINGS)} or a Keyring")


def get_secret(
    name: str | bytes,
    blob: str | bytes | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    keyring: "str | Key | int | None" = None,
) -> bytes:
    """Return the secret `NAME` as bytes: from the kernel cache, or through one resolver upcall.

    Only a key owned by this process's uid is accepted (KeyOwnershipError otherwise).
    `keyring` is None (this process's session keyring, as request_key(2) chooses), "session",
    "user" or "persistent" (shared by every process of this uid), or a Keyring. Without `blob`
    the resolver loads `NAME.kms` from its blob_dir; the callout is then b"", not NULL, because
    request_key(2) never upcalls with a NULL callout. With `prefix="pass"`, NAME is a password
    store entry (its first line), `NAME#all` the whole entry, `NAME#field=KEY` one field.
    """
    # The client's hot path (budget: 1.5x a C request_key + keyctl_read). A key this thread
    # found and checked in the last second for the same name, prefix and keyring is read by
    # serial, one syscall (the kernel still checks its permissions and fails the read once it
    # is revoked, expired or invalidated). Remembered per keyring asked for: what was found for
    # one keyring is no answer for another (a program-bound key is never linked into it,
    # kmskeys/_request.py fetch_failed). Otherwise the full path searches, checks ownership and
    # reads (kmskeys/_hitpath.c); a validated name's description is computed once per process.
    try:
        payload = _read_recent(_SERIALS[name, prefix, keyring])
    except (KeyError, TypeError):  # not remembered, or an unhashable argument: the full path
        payload = None
    if payload is not None:
        return payload
    try:
        desc = _DESCRIPTIONS[name, prefix]
    except (KeyError, TypeError):
        desc = _describe(name, prefix)
        if len(_DESCRIPTIONS) < 1024:
            _DESCRIPTIONS[name, prefix] = desc
    dest = _destination(keyring)
    if blob is None or blob.__class__ is bytes:
        callout = b"" if blob is None else blob
    else:
        from kmskeys.names import as_bytes

        callout = as_bytes(blob, "blob")
    serial, payload = fetch(desc, callout, dest)
    if len(_SERIALS) < 1024:
        _SERIALS[name, prefix, keyring] = serial
    return payload


def fetch(description: bytes, callout_info: bytes | None, dest: int) -> tuple[int, bytes]:
    """The full path of get_secret: find or construct the `user` key `description`, check that
    this process's fsuid owns it (KeyOwnershipError otherwise), read it: (serial, payload).

    request_key(2) links the key it finds or constructs into `dest` (0: the kernel's default).
    One call into C (kmskeys/_hitpath.c); the serial is then checked for this thread for a
    second, so that a read of it costs one syscall.
    """
    try:
        found = _fetch(description, callout_info, dest)
    except OSError as exc:
        from kmskeys._request import fetch_failed

        return fetch_failed(exc, description, callout_info, dest)
    if len(found) == 4:
        from kmskeys._request import foreign

        raise foreign(description.decode(errors="replace"), found)
    serial, payload = found
    assert payload is not None
    return serial, payload
