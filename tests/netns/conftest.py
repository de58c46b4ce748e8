"""Network namespaces with a stand-in IMDS, real clients under real uids, and the firewall CLI.

Each test gets its own namespace (a `kmst` name): `lo` carries 169.254.169.254 and
fd00:ec2::254 with an HTTP server on them, plus servers on 127.0.0.2 and ::1 for "other
destinations". Someone else's rules are installed first, so every test also checks that ours
leave them alone. Servers, namespaces and the test user are removed in `finally`.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import user_keyrings
from tests.support.names import unique

REPO = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).with_name("imds_server.py")

IMDS4 = "169.254.169.254"
IMDS6 = "fd00:ec2::254"
IMDS = (IMDS4, IMDS6)
OTHER = ("127.0.0.2", "::1")
PORTS = (80, 8080)
NOBODY = pwd.getpwnam("nobody")

# Someone else's rules, present before ours and expected untouched after apply and remove.
FOREIGN_NFT = f"""table inet kmst_foreign {{
	chain out {{
		type filter hook output priority filter; policy accept;
		ip daddr {IMDS4} counter accept comment "kmst foreign accept"
	}}
}}
"""
# (iptables-nft creates a built-in chain on first use: with rules in both OUTPUT and FORWARD
# already, "after remove" can be compared with "before apply" exactly.)
FOREIGN_IPT = ["-d", "10.9.9.9/32", "-m", "comment", "--comment", "kmst-foreign"]
FOREIGN_IP6T = ["-d", "fd09::9/128", "-m", "comment", "--comment", "kmst-foreign"]
FOREIGN_HOOKS = ("OUTPUT", "FORWARD")

# The unprivileged client: stdlib only, so a uid that cannot read the venv can run it.
CLIENT = """
import errno, json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
start = time.monotonic()
try:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        data = s.recv(200)
    result = {"ok": data.startswith(b"HTTP/1.0 200"), "error": None}
except OSError as exc:
    result = {"ok": False, "error": errno.errorcode.get(exc.errno or 0, str(exc))}
result["elapsed"] = time.monotonic() - start
print(json.dumps(result))
"""


def firewall_command() -> list[str]:
    """`kmskeys-resolver firewall` once resolver/cli.py delegates to it; the module until then."""
    if (REPO / "resolver" / "cli.py").exists():
        return [str(Path(sys.executable).with_name("kmskeys-resolver")), "firewall"]
    return [sys.executable, "-m", "resolver.firewall"]


def system_python() -> str:
    """A python3 every uid may execute (the venv's may sit under an unreadable home)."""
    found = shutil.which("python3", path=os.defpath)
    assert found, "python3 not found on the default PATH"
    return found


def sh(
    *argv: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; fail loudly when `check` and it fails."""
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return proc


@dataclass
class Attempt:
    """One client connection: did the HTTP request succeed, else which errno, and how long."""

    ok: bool
    error: str | None
    elapsed: float


class Netns:
    """A network namespace the test owns; every helper runs its command inside it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.servers: list[subprocess.Popen[str]] = []

    def run(
        self, *argv: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the namespace."""
        return sh("ip", "netns", "exec", self.name, *argv, check=check, stdin=stdin)

    def firewall(self, *args: str, env_path: str | None = None) -> subprocess.CompletedProcess[str]:
        """`kmskeys-resolver firewall ARGS` inside the namespace, as root; never checked."""
        prefix = ["env", f"PATH={env_path}"] if env_path is not None else []
        return self.run(*prefix, *firewall_command(), *args, check=False)

    def serve(self, *endpoints: str) -> None:
        """Start the stand-in IMDS on ADDRESS:PORT endpoints, as root, and wait until it listens."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, str(SERVER), *endpoints],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.servers.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", "test IMDS server did not start"

    def connect(self, host: str, port: int = 80, uid: int | None = None, gid: int = 0) -> Attempt:
        """An HTTP GET to host:port from a fresh process, as root or as `uid`."""
        drop = (
            [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        )
        out = self.run(*drop, system_python(), "-I", "-c", CLIENT, host, str(port)).stdout
        return Attempt(**json.loads(out))

    def ruleset(self) -> str:
        """Every rule in the namespace without counters or handles, chains in a fixed order:
        nftables' view (iptables-nft included) plus both iptables-save listings."""
        items = json.loads(self.run("nft", "-s", "-j", "list", "ruleset").stdout)["nftables"]
        canonical = sorted(
            json.dumps({kind: {k: v for k, v in obj.items() if k != "handle"}}, sort_keys=True)
            for item in items
            for kind, obj in item.items()
            if kind not in {"rule", "metainfo"}
        )
        rules: dict[str, list[object]] = {}
        for item in items:
            if "rule" in item:
                rule = {k: v for k, v in item["rule"].items() if k != "handle"}
                where = f"{rule['family']} {rule['table']} {rule['chain']}"
                rules.setdefault(where, []).append(rule)
        parts = [*canonical, json.dumps(rules, sort_keys=True)]
        for tool in ("iptables-save", "ip6tables-save"):
            lines = self.run(tool).stdout.splitlines()
            parts.append("\n".join(line for line in lines if not line.startswith("#")))
        return "\n".join(parts)

    def ours_left(self) -> list[str]:
        """Any table or chain of ours still present."""
        found = []
        if "table inet kmskeys" in self.run("nft", "list", "tables").stdout:
            found.append("table inet kmskeys")
        for tool in ("iptables", "ip6tables"):
            found += [
                f"{tool}: {line}"
                for line in self.run(tool, "-S").stdout.splitlines()
                if "KMSKEYS" in line
            ]
        return found

    def close(self) -> None:
        """Stop the servers and delete the namespace (and with it every rule in it)."""
        for proc in self.servers:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()
        sh("ip", "netns", "del", self.name, check=False)


def make_netns(stem: str) -> Netns:
    """A new, empty namespace with `lo` up; the caller must close() it."""
    ns = Netns(unique(stem))
    sh("ip", "netns", "add", ns.name)
    try:
        ns.run("ip", "link", "set", "lo", "up")
    except BaseException:
        ns.close()
        raise
    return ns


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A namespace with the IMDS addresses on lo, servers on them and elsewhere, foreign rules."""
    ns = make_netns("fw")
    try:
        ns.run("ip", "addr", "add", f"{IMDS4}/32", "dev", "lo")
        # nodad: the address is usable at once instead of after duplicate address detection.
        ns.run("ip", "-6", "addr", "add", f"{IMDS6}/128", "dev", "lo", "nodad")
        ns.serve(
            *(f"{IMDS4}:{p}" for p in PORTS),
            *(f"[{IMDS6}]:{p}" for p in PORTS),
            f"{OTHER[0]}:80",
            f"[{OTHER[1]}]:80",
        )
        ns.run("nft", "-f", "-", stdin=FOREIGN_NFT)
        for hook in FOREIGN_HOOKS:
            ns.run("iptables", "-A", hook, *FOREIGN_IPT)
            ns.run("ip6tables", "-A", hook, *FOREIGN_IP6T)
        yield ns
    finally:
        ns.close()


@pytest.fixture(scope="session")
def allowed_user() -> Iterator[pwd.struct_passwd]:
    """A throwaway system user (a `kmst` name) to pass as --allow-user; deleted afterwards."""
    name = unique("u")[:32]
    sh(
        "useradd",
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        "--user-group",
        name,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        user_keyrings.forget([pwd.getpwnam(name).pw_uid])
        sh("userdel", name, check=False)
