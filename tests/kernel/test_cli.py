"""The `kmskeys` console script, run as a subprocess against the real keyring."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kmskeys
from kmskeys import Keyring, cli
from kmskeys.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE
from tests.support.imports import SLOW_IMPORTS, imported_modules
from tests.support.names import unique, unique_prefix
from tests.support.request_key_rule import request_key_rule

pytestmark = pytest.mark.kernel

KMSKEYS = str(Path(sys.executable).with_name("kmskeys"))


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    # The child inherits this process's session keyring (the test's fresh one).
    return subprocess.run(
        [KMSKEYS, *args], input=stdin, capture_output=True, timeout=30, check=False
    )


def test_get_prints_the_cached_secret_only(session_keyring: Keyring) -> None:
    prefix, name = unique_prefix(), unique()
    session_keyring.add_key("user", f"{prefix}:{name}", b"\x00binary\xffsecret")
    result = run("get", name, "--prefix", prefix)
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout == b"\x00binary\xffsecret"
    assert result.stderr == b""


def test_show_lists_names_and_expiry_never_payloads(session_keyring: Keyring) -> None:
    prefix, name, secret = unique_prefix(), unique(), unique("payload").encode()
    key = session_keyring.add_key("user", f"{prefix}:{name}", secret)
    key.set_timeout(3600)
    session_keyring.add_key("user", f"other{prefix}:{name}", b"x")  # another namespace: not shown
    result = run("show", "--prefix", prefix)
    assert result.returncode == EXIT_OK, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == ["SERIAL", "NAME", "STATE", "EXPIRES", "UID", "BYTES"]
    assert len(lines) == 2
    row = lines[1].split()
    assert row[:3] == [str(key.serial), name, "instantiated"]
    assert row[3:5] in (["in", "59m"], ["in", "60m"], ["in", "1h"])
    assert row[-1] == str(len(secret))
    assert secret not in result.stdout + result.stderr


def test_flush_makes_the_next_request_miss(session_keyring: Keyring) -> None:
    prefix, name = unique_prefix(), unique()
    session_keyring.add_key("user", f"{prefix}:{name}", b"v1")
    flushed = run("flush", name, "--prefix", prefix)
    assert flushed.returncode == EXIT_OK, flushed.stderr
    assert b"flushed 1 cached key" in flushed.stdout
    # No resolver serves this prefix, so the next get cannot be answered from the cache.
    again = run("get", name, "--prefix", prefix)
    assert again.returncode == EXIT_NOT_FOUND
    assert again.stdout == b""
    # The miss left a negative key behind (request-key's fallback rule negates it for 30 s):
    # flush removes that too, so a fixed resolver is asked again at once.
    assert b"negative" in run("show", "--prefix", prefix).stdout
    assert b"flushed 1 cached key" in run("flush", name, "--prefix", prefix).stdout
    assert run("flush", name, "--prefix", prefix).stderr.endswith(b"nothing cached\n")


def test_get_unknown_secret_exit_code_and_message(session_keyring: Keyring) -> None:
    result = run("get", unique(), "--prefix", unique_prefix())
    assert result.returncode == EXIT_NOT_FOUND
    assert b"ENOKEY" in result.stderr
    # No rule routes the prefix: the kernel negated the key itself, and the message says so
    # instead of pointing at a resolver log that has no line for it.
    assert b"no resolver answered this request: no rule in /etc/request-key.d" in result.stderr
    assert b"journalctl" not in result.stderr


@pytest.mark.parametrize("bad", ["../etc/passwd", "a//b", "-rf", "x" * 201, "sp ace"])
def test_get_refuses_bad_names_before_any_syscall(bad: str) -> None:
    result = run("get", "--", bad)
    assert result.returncode == EXIT_USAGE
    assert b"secret name" in result.stderr


def test_get_reads_the_blob_from_a_file_or_stdin(session_keyring: Keyring, tmp_path: Path) -> None:
    prefix, name = unique_prefix(), unique()
    session_keyring.add_key("user", f"{prefix}:{name}", b"cached")
    blob = tmp_path / "blob"
    blob.write_text("Q0lDSQ==\n")
    # A cached key is served whatever blob is passed: the callout only matters on a miss.
    assert run("get", name, "--prefix", prefix, "--blob-file", str(blob)).stdout == b"cached"
    piped = run("get", name, "--prefix", prefix, "--blob-file", "-", stdin=b"Q0lDSQ==")
    assert piped.stdout == b"cached"


def test_unknown_command_and_usage() -> None:
    assert run().returncode == EXIT_USAGE
    assert run("--help").returncode == EXIT_OK
    unknown = run("frobnicate")
    assert unknown.returncode == EXIT_USAGE
    assert b"unknown command 'frobnicate'" in unknown.stderr


def test_client_paths_never_import_boto3_or_pycparser(session_keyring: Keyring) -> None:
    prefix, name = unique_prefix(), unique()
    session_keyring.add_key("user", f"{prefix}:{name}", b"x")
    probe = (
        "import sys, io, kmskeys, kmskeys.cli\n"
        f"kmskeys.get_secret({name!r}, prefix={prefix!r})\n"
        "sys.stdout = io.TextIOWrapper(io.BytesIO())\n"
        f"kmskeys.cli.main(['get', {name!r}, '--prefix', {prefix!r}])\n"
        f"kmskeys.cli.main(['show', '--prefix', {prefix!r}])\n"
        "sys.stdout = sys.__stdout__\n"
        "heavy = ('boto3', 'botocore', 'pycparser', 'cryptography', 'typing')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy and m != 'typing'))\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, env=env, check=True)
    assert out.stdout.decode().strip() == "[]"


def test_plain_import_stays_lean() -> None:
    # The fresh-process budget is a few milliseconds: `import kmskeys` must not pull in typing,
    # re or the error classes (they load on the first error).
    probe = (
        "import sys; before = set(sys.modules); import kmskeys\n"
        "print(sorted({'typing', 're', 'kmskeys.errors'} & (set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True)
    assert out.stdout.decode().strip() == "[]"


def test_show_and_flush_survive_hostile_descriptions(session_keyring: Keyring) -> None:
    prefix, name = unique_prefix(), unique()
    session_keyring.add_key("user", f"{prefix}:{name}", b"ok")
    session_keyring.add_key("user", f"{prefix}:evil\nffffffff I--Q--- 1 perm", b"x")
    shown = run("show", "--prefix", prefix)
    assert shown.returncode == EXIT_OK, shown.stderr
    assert name.encode() in shown.stdout
    assert run("flush", name, "--prefix", prefix).returncode == EXIT_OK


@pytest.mark.upcall
def test_flush_then_get_asks_the_resolver_at_once(
    session_keyring: Keyring, capsys: pytest.CaptureFixture[str]
) -> None:
    # flush unlinks as well as invalidates: a request right after it must miss (and upcall),
    # not meet the invalidated key before the key GC has run (EKEYREVOKED, no upcall). In
    # process and back to back: a subprocess's start-up would give the GC time and hide it.
    with request_key_rule("/bin/keyctl instantiate %k fresh %S") as prefix:
        name = unique()
        for _ in range(50):
            session_keyring.add_key("user", f"{prefix}:{name}", b"stale")
            assert cli.main(["flush", name, "--prefix", prefix]) == EXIT_OK
            assert kmskeys.get_secret(name, prefix=prefix) == b"fresh"
    assert "flushed 1 cached key" in capsys.readouterr().out


def test_cached_get_imports_no_argparse_re_pathlib_or_enum(session_keyring: Keyring) -> None:
    # What the Python CLI imports for a get beyond a bare interpreter start (an editable
    # install's finder already imports pathlib and re at every start; tests/packaging checks
    # the absolute set in a regular install). The compiled `kmskeys` answers a cached get
    # without Python (tests/kernel/test_cli_compiled.py); `kmskeys-py` is what it falls back to.
    prefix, name = unique_prefix(), unique()
    session_keyring.add_key("user", f"{prefix}:{name}", b"cached")
    bare = imported_modules([sys.executable, "-c", "pass"])
    python_cli = str(Path(KMSKEYS).with_name("kmskeys-py"))
    got = imported_modules([python_cli, "get", name, "--prefix", prefix, "--keyring", "session"])
    assert "kmskeys.cli" in got
    assert not (got - bare) & SLOW_IMPORTS, sorted(got - bare)


def _via_argparse(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    probe = f"import sys\nfrom kmskeys import cli\nsys.exit(cli.cmd_get({args!r}))\n"
    return subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, timeout=30, check=False, cwd=cwd
    )


@pytest.mark.parametrize(
    "form",
    [
        ["NAME", "--prefix", "P"],
        ["--prefix=P", "NAME", "--keyring", "session"],
        ["--prefix", "P", "--", "NAME"],
        ["NAME", "--prefix", "P", "--blob", "Q0lDSQ=="],
        ["NAME", "--prefix", "P", "--blob-file", "blob"],
        ["NAME", "--prefix", "P", "--blob-file", "./blob"],
        ["NAME", "--prefix", "P", "--blob-file", "missing//blob"],
        ["NAME", "--prefix", "P", "--blob-file", ""],
        ["NAME", "--prefix", "P", "--blob", "x", "--blob-file", "blob"],
        ["NAME", "--prefix"],
        ["NAME", "--pre", "P"],
        ["NAME", "--prefix", "P", "--prefix", "P"],
        ["NAME", "--keyring", "nosuch", "--prefix", "P"],
        ["--prefix", "P"],
        ["NAME", "NAME", "--prefix", "P"],
        ["NAME", "--prefix", "-P"],
        ["-h"],
        ["--", "-rf"],
        ["NAME", "--prefix", "Bad Prefix"],
    ],
)
def test_get_answers_exactly_as_argparse_would(
    form: list[str], session_keyring: Keyring, tmp_path: Path
) -> None:
    # `kmskeys get` parses plain argument lists by hand (no argparse import) and hands the rest
    # to argparse: output, stderr and exit code must be those of the argparse path every time.
    prefix, name = unique_prefix(), unique()
    session_keyring.add_key("user", f"{prefix}:{name}", b"cached")
    (tmp_path / "blob").write_text("Q0lDSQ==\n")
    args = [name if a == "NAME" else a.replace("P", prefix) for a in form]
    fast = subprocess.run(
        [KMSKEYS, "get", *args], capture_output=True, timeout=30, check=False, cwd=tmp_path
    )
    slow = _via_argparse(args, tmp_path)
    assert (fast.returncode, fast.stdout, fast.stderr) == (
        slow.returncode,
        slow.stdout,
        slow.stderr,
    )
