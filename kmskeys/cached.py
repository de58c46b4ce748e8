"""Cached failures: the negative keys this process's keyrings hold, and where each came from.

A refusal or an unknown name is answered with a negative key that request_key(2) returns again,
without an upcall, until it expires. That key is the only trace of the earlier failure, so the
client names it in its error (and `kmskeys doctor` lists them): which key, when it expires, and
who put it there. The resolver's answer clears the possessor bits (contract.NEGATIVE_KEY_PERM);
a key with the kernel's default mask was negated by the kernel itself, for 60 s, because no
resolver answered the upcall (no rule for the prefix, a program that could not start, a host
that refuses upcalls of non-root requesters), and the error says that instead of "check the
name". The client's failure path: imported only when a request fails; stdlib and the keyutils
binding only.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from kmskeys import keyutils, prockeys
from kmskeys.contract import DEFAULT_PREFIX, POSSESSOR_MASK, REQUEST_KEY_D
from kmskeys.errors import ERRNO_CACHED, KeyctlError, KmsKeysError, error_for_errno
from kmskeys.prockeys import ProcKey

# The keyrings `kmskeys flush` unlinks from: a negative key reachable from them is one a request
# of this process can meet, and one flush can remove.
OWN_KEYRINGS = (
    keyutils.KEY_SPEC_THREAD_KEYRING,
    keyutils.KEY_SPEC_PROCESS_KEYRING,
    keyutils.KEY_SPEC_SESSION_KEYRING,
    keyutils.KEY_SPEC_USER_KEYRING,
    keyutils.KEY_SPEC_USER_SESSION_KEYRING,
)
# When request-key runs no program that answers, the kernel negates the key itself with ENOKEY
# for key_negative_timeout, a fixed 60 s (security/keys/request_key.c); no sysctl changes it.
KERNEL_NEGATIVE_TIMEOUT = 60


def _is_keyring(serial: int) -> bool:
    try:
        return keyutils.keyctl_describe_alloc(serial).startswith(b"keyring;")
    except KeyctlError:
        return False


def _reachable() -> Iterator[int]:
    """Serials linked from this process's own keyrings, nested keyrings included."""
    # Which members to descend into: what /proc/keys calls a keyring, confirmed by describe
    # (reading a key that is not a keyring would read its payload).
    claimed = {key.serial for key in prockeys.lines() if key.type == "keyring"}
    seen: set[int] = set()
    pending = []
    for spec in OWN_KEYRINGS:
        try:
            pending.append(keyutils.keyctl_get_keyring_ID(spec, False))
        except KeyctlError:
            continue  # this process has no such keyring
    while pending:
        ring = pending.pop()
        if ring in seen:
            continue
        seen.add(ring)
        try:
            members = memoryview(keyutils.keyctl_read(ring)).cast("i").tolist()
        except KeyctlError:
            continue
        for serial in members:
            yield serial
            if serial in claimed and _is_keyring(serial):
                pending.append(serial)


def negative_keys(prefix: str | None = None) -> list[ProcKey]:
    """The negative `user` keys this process's keyrings hold, under `prefix:` when given."""
    head = "" if prefix is None else prefix + ":"

    def wanted(key: ProcKey) -> bool:
        return key.negative and key.type == "user" and key.rest.startswith(head)

    keys = prockeys.keys(wanted)
    if not keys:
        return []
    found = {serial for serial in _reachable() if serial in keys}
    return sorted((keys[s] for s in found), key=lambda k: k.description)


def cached_failure(description: str) -> ProcKey | None:
    """The negative key `description` this process's keyrings hold, if any (None on error)."""
    prefix = description.partition(":")[0]
    try:
        found = [k for k in negative_keys(prefix) if k.description == description]
    except (OSError, ValueError):
        return None
    return found[0] if found else None


def answered_by_resolver(key: ProcKey) -> bool:
    """The resolver rejected this key (it clears the possessor bits the kernel's default sets)."""
    return not key.perm & POSSESSOR_MASK


def flush_command(description: str) -> str:
    """The `kmskeys flush` command line that drops a cached failure of `description`."""
    prefix, _, name = description.partition(":")
    shown = name if _shell_safe(name) else "'" + name.replace("'", "'\\''") + "'"
    option = "" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}"
    return f"kmskeys flush {shown}{option}"


def _shell_safe(text: str) -> bool:
    return bool(text) and all(ch.isalnum() or ch in "_./@+-:" for ch in text)


def no_resolver_cause(prefix: str) -> str:
    """Why no resolver answered a request for PREFIX:*, as far as this process can tell."""
    from kmskeys.rules import read_rule, rule_file

    base = Path(REQUEST_KEY_D)
    path = rule_file(prefix, base)
    try:
        rule = read_rule(path, prefix)
    except FileNotFoundError:
        rule = None
    except (OSError, UnicodeDecodeError):
        return f"the rule file {path} cannot be read here; run `kmskeys doctor` as root"
    if rule is None:
        return (
            f"no rule in {base} routes {prefix}:* to a resolver (not installed here, or the app "
            "should use another prefix)"
        )
    first = rule.gate or rule.program
    for program in (first, rule.program):
        if not _runnable(program):
            return f"the rule in {path} runs {program}, which is missing or not executable"
    if os.geteuid() != 0:
        return (
            f"the rule in {path} runs {first}, but nothing answered for this non-root "
            "requester: this host may refuse upcalls of non-root requesters (the first request "
            "then failed with ENOENT), or the program could not start (see the resolver log)"
        )
    return (
        f"the rule in {path} runs {first}, which did not answer: it could not start or died "
        "before answering (see the resolver log)"
    )


def _runnable(program: Path) -> bool:
    """Whether root could run `program` (request-key runs it as root), as far as this process
    can see: a path it cannot look into counts as runnable."""
    try:
        st = os.stat(program)
    except PermissionError:
        return True
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


def explained(exc: KmsKeysError, description: str) -> KmsKeysError:
    """`exc` from a request for `description`, naming the cached failure that holds it, if any,
    and who put it there: the resolver's answer, or the kernel's when no resolver answered."""
    err = exc.errno
    if err not in ERRNO_CACHED:
        return exc
    negative = cached_failure(description)
    if negative is None:
        return exc
    retry = f"`{flush_command(description)}` to retry now"
    what = "request_key " + description[:256]
    if err == errno.ENOKEY and not answered_by_resolver(negative):
        cause = (
            f"no resolver answered this request: {no_resolver_cause(description.partition(':')[0])}"
            f"; the kernel caches such a failed upcall for {KERNEL_NEGATIVE_TIMEOUT} s as a "
            f"cached failure (key {negative.serial}), which expires {negative.expires}"
        )
        return error_for_errno(
            err, what, upcall=True, description=description, cached=retry, cause=cause
        )
    note = (
        f"cached failure (key {negative.serial}), the resolver's answer, expires "
        f"{negative.expires}; {retry}"
    )
    return error_for_errno(err, what, upcall=True, description=description, cached=note)
