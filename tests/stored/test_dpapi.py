"""DPAPI through the real upcall: scopes and uids, rotation, entropy, tampering, the CLI's streams.

User A and user B are two uids that the kernel tells apart by fsuid (conftest.as_user). The data
protected here is test data; nothing printed or compared in messages is key material.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from pathlib import Path

import pytest

import kmskeys
from kmskeys import dpapi
from kmskeys.cli import (
    EXIT_NOT_A_BLOB,
    EXIT_NOT_AUTHENTIC,
    EXIT_OK,
    EXIT_SCOPE_POLICY,
    EXIT_UNKNOWN_VERSION,
)
from kmskeys.protectblob import (
    DEFAULT_CHUNK,
    TAG_BYTES,
    ProtectHeader,
    from_text,
    read_header,
    to_text,
)
from tests.stored.conftest import UID_A, UID_B, as_user
from tests.stored.harness import StoredInstall
from tests.support.names import unique
from tests.upcall.harness import KMSKEYS, run_resolver

pytestmark = pytest.mark.upcall


# unique("machine") matches conftest.MACHINE_GLOB, unique("aonly") its A_ONLY_GLOB.


def _parts(blob: str | bytes) -> tuple[ProtectHeader, bytes, bytes]:
    """The header, its bytes and the chunks of a blob (text or binary form)."""
    raw = from_text(blob) if isinstance(blob, str) else blob
    header, head = read_header(io.BytesIO(raw).read)
    return header, head, raw[len(head) :]


# --- scopes and uids ----------------------------------------------------------------------------


def test_two_uids_get_different_keys(stored: StoredInstall) -> None:
    name = unique("twokeys")

    def digest() -> str:
        return hashlib.sha256(stored.request(name)).hexdigest()

    a1, a2, b = as_user(UID_A, digest), as_user(UID_A, digest), as_user(UID_B, digest)
    assert "ok" in a1 and a1 == a2  # A's key is A's, request after request
    assert "ok" in b and b != a1
    assert stored.entry(name, uid=UID_A).exists() and stored.entry(name, uid=UID_B).exists()


def test_b_cannot_unprotect_a_user_scope_blob(stored: StoredInstall) -> None:
    name = unique("private")
    blob = as_user(UID_A, lambda: kmskeys.protect(b"for A", name=name, prefix=stored.stored_prefix))
    assert isinstance(blob.get("ok"), str), blob
    text = str(blob["ok"])
    opened = as_user(UID_A, lambda: kmskeys.unprotect(text, prefix=stored.stored_prefix).decode())
    assert opened == {"ok": "for A"}
    refused = as_user(UID_B, lambda: kmskeys.unprotect(text, prefix=stored.stored_prefix))
    assert refused["error"] == "WrongUserError"
    assert f"protected for uid {UID_A}; you are uid {UID_B}" in str(refused["message"])
    # B rewriting the uid in the header asks for B's own key: B has none, and an unprotect
    # never makes one; once B has one, nothing authenticates under it.
    header, _, chunks = _parts(text)
    forged = to_text(header.replace(uid=UID_B).encode() + chunks)
    tampered = as_user(UID_B, lambda: kmskeys.unprotect(forged, prefix=stored.stored_prefix))
    assert tampered["error"] == "UnknownKeyVersionError", tampered
    assert not stored.entry(name, uid=UID_B).exists()
    assert "ok" in as_user(
        UID_B, lambda: kmskeys.protect(b"B", name=name, prefix=stored.stored_prefix)
    )
    tampered = as_user(UID_B, lambda: kmskeys.unprotect(forged, prefix=stored.stored_prefix))
    assert tampered["error"] == "ProtectAuthenticationError", tampered


def test_machine_scope_works_for_both_users(stored: StoredInstall) -> None:
    name = unique("machine")
    blob = as_user(
        UID_A,
        lambda: kmskeys.protect(
            b"host data", name=name, scope="machine", prefix=stored.stored_prefix
        ),
    )
    text = str(blob["ok"])
    for uid in (UID_A, UID_B, 0):
        got = as_user(uid, lambda: kmskeys.unprotect(text, prefix=stored.stored_prefix).decode())
        assert got == {"ok": "host data"}, (uid, got)
    assert stored.entry(name, uid=None).exists()
    assert dpapi.inspect(text).uid is None


def test_scope_not_allowed_by_policy(stored: StoredInstall) -> None:
    user_name, machine_name = unique("userscoped"), unique("machine")
    for name, scope, held in ((user_name, "machine", "user"), (machine_name, "user", "machine")):
        with pytest.raises(kmskeys.ScopeNotAllowedError) as caught:
            kmskeys.protect(b"x", name=name, scope=scope, prefix=stored.stored_prefix)
        message = str(caught.value)
        assert message.startswith("scope not allowed by policy")
        assert f"is {held}-scoped" in message and f"scope={held!r}" in message
        assert "scope not allowed by policy" in stored.log.wait_for(name)


def test_allow_users_keeps_others_out(stored: StoredInstall) -> None:
    name = unique("aonly")
    ok = as_user(UID_A, lambda: kmskeys.protect(b"a", name=name, prefix=stored.stored_prefix))
    assert "ok" in ok
    denied = as_user(UID_B, lambda: kmskeys.protect(b"b", name=name, prefix=stored.stored_prefix))
    assert denied["error"] == "KeyRejectedError"
    assert not stored.entry(name, uid=UID_B).exists()


# --- versions -----------------------------------------------------------------------------------


def test_rotation_keeps_old_blobs_readable(stored: StoredInstall) -> None:
    name = unique("rotate")
    prefix = stored.stored_prefix
    old = as_user(UID_A, lambda: kmskeys.protect(b"before", name=name, prefix=prefix))
    text_old = str(old["ok"])
    assert dpapi.inspect(text_old).key_version == 1
    config = ["stored", "--config", str(stored.config)]
    done = run_resolver(*config, "rotate", name, "--uid", str(UID_A))
    assert done.returncode == 0, done.stderr
    assert f"user:{UID_A}/{name}#v2: created" in done.stdout
    new = as_user(UID_A, lambda: kmskeys.protect(b"after", name=name, prefix=prefix))
    text_new = str(new["ok"])
    assert dpapi.inspect(text_new).key_version == 2

    def both() -> list[str]:
        return [kmskeys.unprotect(t, prefix=prefix).decode() for t in (text_old, text_new)]

    assert as_user(UID_A, both) == {"ok": ["before", "after"]}
    listed = run_resolver(*config, "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines() if name in line]
    assert [(r[0], r[1], r[3], r[4], r[5], r[7]) for r in rows] == [
        ("user", str(UID_A), "1", "32", "none", "ok"),
        ("user", str(UID_A), "2", "32", "none", "ok"),
    ]
    # Metadata only: neither key appears in the listing, in hex or in base64.
    for version in (1, 2):
        key = stored.entry(name, version, UID_A).read_bytes()[-64:-32]
        assert key.hex() not in listed.stdout and to_text(key)[7:] not in listed.stdout


@pytest.mark.parametrize("scope", ["user", "machine"])
def test_rotate_flushes_so_the_next_protect_uses_the_new_version(
    stored: StoredInstall, scope: str
) -> None:
    # Same process, same session keyring: the first protect cached `NAME#SCOPE#latest` = 1
    # (for the name's ttl, 300 s); rotate flushes it host-wide by itself.
    name = unique("machine" if scope == "machine" else "rotflush")
    prefix = stored.stored_prefix
    first = kmskeys.protect(b"before", name=name, scope=scope, prefix=prefix)
    assert dpapi.inspect(first).key_version == 1
    whose = ["--machine"] if scope == "machine" else ["--uid", "0"]
    done = run_resolver("stored", "--config", str(stored.config), "rotate", name, *whose)
    assert done.returncode == 0, done.stderr
    assert f"{name}: flushed " in done.stdout, done.stdout
    again = kmskeys.protect(b"after", name=name, scope=scope, prefix=prefix)
    assert dpapi.inspect(again).key_version == 2
    assert [kmskeys.unprotect(t, prefix=prefix) for t in (first, again)] == [b"before", b"after"]


def test_rotate_refuses_the_wrong_scope(stored: StoredInstall) -> None:
    config = ["stored", "--config", str(stored.config), "rotate"]
    machine = run_resolver(*config, unique("userkey"), "--machine")
    assert machine.returncode == 1 and "scope not allowed by policy" in machine.stderr
    nobody = run_resolver(*config, unique("userkey"))
    assert nobody.returncode == 1 and "--uid U" in nobody.stderr
    host = run_resolver(*config, unique("machine"), "--uid", "0")
    assert host.returncode == 1 and "give --machine" in host.stderr


def test_unknown_key_version(stored: StoredInstall) -> None:
    name = unique("noversion")
    header, _, chunks = _parts(kmskeys.protect(b"x", name=name, prefix=stored.stored_prefix))
    future = to_text(header.replace(key_version=7).encode() + chunks)
    with pytest.raises(kmskeys.UnknownKeyVersionError) as caught:
        kmskeys.unprotect(future, prefix=stored.stored_prefix)
    assert "no version 7" in str(caught.value)


# --- entropy, tampering, truncation --------------------------------------------------------------


def test_entropy_and_description(stored: StoredInstall) -> None:
    name = unique("entropy")
    prefix = stored.stored_prefix
    text = kmskeys.protect(
        b"payload", name=name, entropy=b"salt of the app", description="db backup", prefix=prefix
    )
    assert kmskeys.unprotect_with_description(text, entropy=b"salt of the app", prefix=prefix) == (
        b"payload",
        "db backup",
    )
    for wrong in (b"", b"salt of the ap", b"salt of the app\0"):
        with pytest.raises(kmskeys.ProtectAuthenticationError):
            kmskeys.unprotect(text, entropy=wrong, prefix=prefix)


def test_tampering_is_caught(stored: StoredInstall) -> None:
    prefix = stored.stored_prefix
    raw = from_text(kmskeys.protect(b"z" * 5000, description="label", prefix=prefix))
    _, head, chunks = _parts(raw)
    at_description = head.index(b"label")
    for position in (at_description, len(head) + 10, len(raw) - 1, len(head) - 40):
        damaged = bytearray(raw)
        damaged[position] ^= 0x20
        with pytest.raises((kmskeys.ProtectAuthenticationError, kmskeys.NotAProtectBlobError)):
            kmskeys.unprotect(bytes(damaged), prefix=prefix)
    with pytest.raises(kmskeys.ProtectAuthenticationError):
        kmskeys.unprotect(head + chunks[:-1], prefix=prefix)
    with pytest.raises(kmskeys.TruncatedProtectBlobError):
        kmskeys.unprotect(head, prefix=prefix)
    for garbage in (b"", b"kmsdpap", b"hello world", b"kmsdp1:!!!", raw[:20]):
        with pytest.raises(kmskeys.NotAProtectBlobError):
            kmskeys.unprotect(garbage, prefix=prefix)


# --- the CLI ------------------------------------------------------------------------------------


def _cli(
    *args: str, stdin: bytes, stdout: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `kmskeys ARGS` with `stdin`; stdout to the file `stdout`, else captured."""
    if stdout is None:
        return subprocess.run(
            [str(KMSKEYS), *args], input=stdin, capture_output=True, timeout=120, check=False
        )
    with stdout.open("ab") as out:  # appending, as `>>` does
        return subprocess.run(
            [str(KMSKEYS), *args],
            input=stdin,
            stdout=out,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )


def _one_line(done: subprocess.CompletedProcess[bytes]) -> str:
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_cli_streams_large_input(stored: StoredInstall, tmp_path: Path) -> None:
    data = os.urandom(3 * DEFAULT_CHUNK + 12345)
    blob, back = tmp_path / "blob", tmp_path / "out"
    entropy = tmp_path / "entropy"
    entropy.write_bytes(os.urandom(64))
    prefix = ["--prefix", stored.stored_prefix, "--entropy-file", str(entropy)]
    done = _cli("protect", "--description", "big file", *prefix, stdin=data, stdout=blob)
    assert done.returncode == EXIT_OK, done.stderr
    assert len(blob.read_bytes()) > len(data)
    done = _cli("unprotect", "--show-description", *prefix, stdin=blob.read_bytes(), stdout=back)
    assert done.returncode == EXIT_OK, done.stderr
    assert back.read_bytes() == data
    assert done.stderr.decode() == "description: big file\n"
    # The library's text form unprotects from the shell too.
    text = kmskeys.protect(b"from python", prefix=stored.stored_prefix)
    done = _cli("unprotect", "--prefix", stored.stored_prefix, stdin=text.encode())
    assert (done.returncode, done.stdout) == (EXIT_OK, b"from python")


def test_cli_truncation_and_reordering(stored: StoredInstall, tmp_path: Path) -> None:
    data = os.urandom(3 * DEFAULT_CHUNK + 100)
    prefix = ["--prefix", stored.stored_prefix]
    protected = _cli("protect", *prefix, stdin=data)
    assert protected.returncode == EXIT_OK
    raw = protected.stdout
    _, head, chunks = _parts(raw)
    seg = DEFAULT_CHUNK + TAG_BYTES
    parts = [chunks[i : i + seg] for i in range(0, len(chunks), seg)]
    assert len(parts) == 4
    cases = {
        "last chunk dropped": head + b"".join(parts[:3]),
        "cut inside a chunk": raw[: len(head) + seg + 1000],
        "chunks 1 and 2 swapped": head + parts[0] + parts[2] + parts[1] + parts[3],
        "tail cut by a byte": raw[:-1],
        "a byte appended": raw + b"\0",
    }
    for what, damaged in cases.items():
        out = tmp_path / "out"
        out.write_bytes(b"earlier content\n")
        # Appending (`>>`): rolled back to where unprotect began, not to 0.
        done = _cli("unprotect", *prefix, stdin=damaged, stdout=out)
        assert done.returncode == EXIT_NOT_AUTHENTIC, (what, done.stderr)
        assert _one_line(done).startswith("kmskeys unprotect: the blob ")
        assert out.read_bytes() == b"earlier content\n", what  # no plaintext left behind
    assert "ends early, after chunk 2" in _one_line(
        _cli("unprotect", *prefix, stdin=head + b"".join(parts[:3]))
    )
    # On a pipe, chunks that authenticated before the failure have been written: the exit code
    # is what says the output is incomplete.
    piped = _cli("unprotect", *prefix, stdin=cases["chunks 1 and 2 swapped"])
    assert piped.returncode == EXIT_NOT_AUTHENTIC
    assert piped.stdout == data[:DEFAULT_CHUNK]


def test_cli_errors_are_one_line_with_their_exit_code(stored: StoredInstall) -> None:
    prefix = ["--prefix", stored.stored_prefix]
    not_blob = _cli("unprotect", *prefix, stdin=b"plain text, not a blob")
    assert not_blob.returncode == EXIT_NOT_A_BLOB and not not_blob.stdout
    assert "not a protect blob" in _one_line(not_blob)
    empty = _cli("unprotect", *prefix, stdin=b"")
    assert empty.returncode == EXIT_NOT_A_BLOB
    policy = _cli("protect", "--scope", "machine", *prefix, stdin=b"x")
    assert policy.returncode == EXIT_SCOPE_POLICY
    assert "scope not allowed by policy" in _one_line(policy)
    name = unique("cliversion")
    header, _, chunks = _parts(kmskeys.protect(b"x", name=name, prefix=stored.stored_prefix))
    future = header.replace(key_version=9).encode() + chunks
    unknown = _cli("unprotect", *prefix, stdin=future)
    assert unknown.returncode == EXIT_UNKNOWN_VERSION and "no version 9" in _one_line(unknown)


def test_client_import_path_stays_free_of_dpapi() -> None:
    probe = (
        "import sys, kmskeys, kmskeys.cli\n"
        "kmskeys.cli.main(['--help'])\n"
        "heavy = ('cryptography', 'kmskeys.dpapi', 'kmskeys.protectblob', 'kmskeys.dpapi_cli')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)), file=sys.stderr)\n"
    )
    out = subprocess.run(
        [str(KMSKEYS.parent / "python"), "-c", probe], capture_output=True, check=True, timeout=60
    )
    assert out.stderr.decode().strip() == "[]"


class _FileLike:
    """A reader that is not io.BytesIO, so the stream code reads into its own buffers."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        return self._data.readinto(buffer)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 8192, 3 * 4096 + 5])
def test_streams_in_memory_and_from_files_agree(stored: StoredInstall, size: int) -> None:
    prefix, data = stored.stored_prefix, os.urandom(size)
    blobs = []
    for source in (io.BytesIO(data), _FileLike(data)):
        out = io.BytesIO()
        dpapi.protect_stream(source, out, prefix=prefix, chunk_size=4096)
        blobs.append(out.getvalue())
    chunks = max(1, -(-size // 4096))
    for blob in blobs:
        _, _, sealed = _parts(blob)
        assert len(sealed) == size + chunks * TAG_BYTES
        for source in (io.BytesIO(blob), _FileLike(blob)):
            out = io.BytesIO()
            dpapi.unprotect_stream(source, out, prefix=prefix)
            assert out.getvalue() == data
        assert kmskeys.unprotect(blob, prefix=prefix) == data


def test_binary_and_text_forms_are_one_blob(stored: StoredInstall) -> None:
    prefix = stored.stored_prefix
    data = os.urandom(DEFAULT_CHUNK + 1)  # two chunks
    binary = kmskeys.protect_bytes(data, description="two chunks", prefix=prefix)
    assert isinstance(binary, bytearray)
    text = to_text(binary)
    assert kmskeys.unprotect(binary, prefix=prefix) == data
    assert kmskeys.unprotect_with_description(text, prefix=prefix) == (data, "two chunks")
    assert dpapi.inspect(binary) == dpapi.inspect(text)


def test_roots_flush_of_a_name_reaches_every_qualified_form(stored: StoredInstall) -> None:
    # Issue 20.6: root's `kmskeys flush NAME` reaches NAME, NAME#user#latest, NAME#user#vN and
    # every other qualified form (as root: every uid's keys too, tests/isolation/test_hostflush.py).
    name = unique("flushforms")
    prefix = stored.stored_prefix
    forms = ["", "#user", "#user#latest", "#latest", "#user#v1", "#v1"]
    for form in forms:
        assert stored.request(name, qualifier=form)  # a key, or its latest version number
    other = unique("flushforms")  # a name that merely starts alike stays
    assert len(stored.request(other)) == 32

    def cached(which: str) -> set[str]:
        from kmskeys import prockeys

        def wanted(key: prockeys.ProcKey) -> bool:
            return key.description.split("#")[0] == f"{prefix}:{which}"

        found = prockeys.keys(wanted).values()
        return {k.description for k in found if k.state == "instantiated"}

    assert {f"{prefix}:{name}{form}" for form in forms} <= cached(name)
    done = subprocess.run(
        ["keyctl", "session", "-", str(KMSKEYS), "flush", name, "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and "flushed" in done.stdout, done.stderr
    assert f"flushed {len(forms)} cached keys" in done.stdout, done.stdout
    assert cached(name) == set()
    assert cached(other) == {f"{prefix}:{other}"}
