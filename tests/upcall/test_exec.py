"""`kmskeys exec`: secrets resolved through the real upcall, then the command exec'd in place.

The command is a small Python program (REPORT) that says what it was given: its environment,
its $CREDENTIALS_DIRECTORY with each file's mode and owner, its own cmdline and environ, and
its mount table (the private filesystem is mounted nowhere, so that table must not change).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from kmskeys import Keyring
from kmskeys.cli import EXIT_COMMAND_NOT_FOUND, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE
from tests.support.kms_proxy import Fault, ProxiedRequest, kms_error
from tests.support.names import unique, unique_prefix
from tests.support.requester import as_user, entry
from tests.upcall.conftest import KMSKEYS, Install

pytestmark = pytest.mark.upcall

REPORT = r"""
import json, os, stat, sys
out = {"pid": os.getpid(), "env": {k: os.environ.get(k) for k in sys.argv[1:]}}
where = os.environ.get("CREDENTIALS_DIRECTORY")
if where:
    st = os.stat(where)
    out["dir"] = {"path": where, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid}
    out["files"] = {}
    for name in sorted(os.listdir(where)):
        path = os.path.join(where, name)
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read()
        out["files"][name] = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                              "gid": st.st_gid, "data": data.hex()}
for what in ("cmdline", "environ"):
    with open(f"/proc/self/{what}", "rb") as f:
        out[what] = f.read().hex()
with open("/proc/self/mountinfo") as f:
    out["mounts"] = sorted(line.split(" ", 4)[4] for line in f)
print(json.dumps(out))
"""


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split(" ", 4)[4] for line in f)


def kmskeys_exec(install: Install, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `kmskeys exec --prefix P ARGS`; the process and its pid (the command's, once exec'd)."""
    with subprocess.Popen(
        [str(KMSKEYS), "exec", "--prefix", install.prefix, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def deployed(install: Install, count: int) -> list[tuple[str, bytes]]:
    """`count` names with blobs in the install's blob_dir, and their secrets."""
    pairs = [(unique(), unique("secret").encode()) for _ in range(count)]
    for name, secret in pairs:
        install.deploy(name, install.blob(secret, name))
    return pairs


def report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == EXIT_OK, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_env_injection_from_flags_and_a_mapping_file(resolver: Install, tmp_path: Path) -> None:
    # Two names: `kmskeys exec` has at most two misses in flight (MAX_THREADS).
    (one, s1), (two, s2) = deployed(resolver, 2)
    mapping = tmp_path / "mapping"
    mapping.write_text(f"# names of secrets, never values\n\nB_TOKEN = {two}\nC={one}\n")
    done, pid = kmskeys_exec(
        resolver, "--env", f"A_PASSWORD={one}", "--env-file", str(mapping),
        "--", sys.executable, "-c", REPORT, "A_PASSWORD", "B_TOKEN", "C",
    )  # fmt: skip
    out = report(done)
    assert out["env"] == {"A_PASSWORD": s1.decode(), "B_TOKEN": s2.decode(), "C": s1.decode()}
    assert out["pid"] == pid  # exec'd in place: no wrapper process, no shell
    assert resolver.decrypts() == 2  # a name asked for twice is resolved once
    assert not any(s.hex() in out["cmdline"] for s in (s1, s2))
    assert "CREDENTIALS_DIRECTORY" not in bytes.fromhex(out["environ"]).decode()


def test_secrets_are_resolved_concurrently(resolver: Install) -> None:
    # The proxy holds each Decrypt at a barrier until both have arrived: resolved one after the
    # other, the first would wait alone, break the barrier and be answered with an error, and
    # the command would not run. (Two: `kmskeys exec` has at most two misses in flight.)
    pairs = deployed(resolver, 2)
    barrier = threading.Barrier(len(pairs), timeout=2.5)  # under the resolver's 4 s deadline

    def hold(request: ProxiedRequest) -> Fault | None:
        if request.operation != "Decrypt":
            return None
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return kms_error("KMSInternalException", 500)
        return None

    assert resolver.proxy is not None
    resolver.proxy.set_fault(hold)
    env = [f"--env=V{i}={name}" for i, (name, _) in enumerate(pairs)]
    done, _ = kmskeys_exec(resolver, *env, "--", sys.executable, "-c", REPORT, "V0", "V1")
    out = report(done)
    assert out["env"] == {f"V{i}": secret.decode() for i, (_, secret) in enumerate(pairs)}


def test_file_injection_private_read_only_and_mounted_nowhere(resolver: Install) -> None:
    (one, s1), (two, s2) = deployed(resolver, 2)
    before = _mounts()
    done, pid = kmskeys_exec(
        resolver, "--file", f"db={one}", "--file", f"api.token={two}", "--env", f"ALSO={one}",
        "--", sys.executable, "-c", REPORT, "ALSO",
    )  # fmt: skip
    out = report(done)
    assert out["pid"] == pid
    assert out["dir"]["path"].startswith("/proc/self/fd/")
    assert (out["dir"]["mode"], out["dir"]["uid"]) == (0o500, os.geteuid())
    assert out["files"] == {
        "api.token": {"mode": 0o400, "uid": os.geteuid(), "gid": os.getegid(), "data": s2.hex()},
        "db": {"mode": 0o400, "uid": os.geteuid(), "gid": os.getegid(), "data": s1.hex()},
    }
    assert out["env"] == {"ALSO": s1.decode()}
    # The file secret is in no argv and no environment; the files are in no mount table.
    assert s2.hex() not in out["cmdline"] + out["environ"]
    assert out["mounts"] == before == _mounts()
    assert resolver.decrypts() == 2


def test_one_failing_secret_means_no_exec(resolver: Install, tmp_path: Path) -> None:
    (good, secret), missing = deployed(resolver, 1)[0], unique("missing")
    marker = tmp_path / "ran"
    done, _ = kmskeys_exec(
        resolver, "--env", f"GOOD={good}", "--file", f"bad={missing}",
        "--", "/bin/touch", str(marker),
    )  # fmt: skip
    assert done.returncode == EXIT_NOT_FOUND, done.stderr
    assert not marker.exists()
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert f"secret {missing!r}" in done.stderr
    assert secret.decode() not in done.stderr


def test_usage_errors_and_a_missing_command_resolve_nothing(resolver: Install) -> None:
    ((name, _),) = deployed(resolver, 1)
    for args, code in (
        (["--env", f"A={name}", "true"], EXIT_USAGE),  # no --
        (["--env", f"1A={name}", "--", "true"], EXIT_USAGE),
        (["--file", f"../x={name}", "--", "true"], EXIT_USAGE),
        (["--env", f"A={name}", "--env", f"A={name}", "--", "true"], EXIT_USAGE),
        (["--env", "A=../etc/passwd", "--", "true"], EXIT_USAGE),
        (["--", "true"], EXIT_USAGE),
        (["--env", f"A={name}", "--", unique("nosuchcommand")], EXIT_COMMAND_NOT_FOUND),
    ):
        done, _ = kmskeys_exec(resolver, *args)
        assert done.returncode == code, (args, done.stderr)
        assert len(done.stderr.splitlines()) == 1, done.stderr
    assert resolver.decrypts() == 0


SH_REPORT = 'cd "$CREDENTIALS_DIRECTORY" && stat -c "%n %a %u %g" . token && cat token'


def _exec_as_user(prefix: str, name: str, secret: bytes) -> object:
    # In the child, as the user: a key of its own in its fresh session keyring (no upcall), then
    # `kmskeys exec --file` as that user, whose private filesystem needs a user namespace. The
    # venv's interpreter may lie below a directory the user cannot enter, so kmskeys runs in a
    # fork of this process and the command is /bin/sh.
    from kmskeys import cli

    Keyring.session().add_key("user", f"{prefix}:{name}", secret)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(write, 1)
            os.dup2(write, 2)
            sys.stdout = sys.stderr = open(1, "w", closefd=False)  # noqa: SIM115
            # A process that changed its uids without an execve is not dumpable (the kernel
            # then gives /proc/self/uid_map to root); one started as the user, as kmskeys exec
            # always is, is. Be the latter.
            ctypes.CDLL(None, use_errno=True).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
            code = cli.main(
                ["exec", "--prefix", prefix, "--file", f"token={name}", "--", "/bin/sh", "-c",
                 SH_REPORT]
            )  # fmt: skip
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as out:
        text = out.read()
    _, status = os.waitpid(pid, 0)
    return {"code": os.waitstatus_to_exitcode(status), "out": text.hex()}


def test_file_injection_as_a_non_root_user(session_keyring: Keyring) -> None:
    user = entry("nobody")
    prefix, name, secret = unique_prefix(), unique(), unique("secret").encode()
    result = as_user("nobody", lambda: _exec_as_user(prefix, name, secret), mode="setuid")
    assert isinstance(result, dict) and "ok" in result, result
    done = result["ok"]
    out = bytes.fromhex(done["out"])
    assert done["code"] == EXIT_OK, out
    uid, gid = user.pw_uid, user.pw_gid
    assert out == f". 500 {uid} {gid}\ntoken 400 {uid} {gid}\n".encode() + secret
