"""A password store for a test: a user, a GnuPG key, `pass` entries and that user's gpg-agent.

`pass_user(base)` creates a kmst-tagged system user whose home is `base/home` (removed after,
even on failure), and `pass_owner(base, pw)` does the same setup for an existing account (root,
in a directory of the test: root's own home is never touched). Either way the owner gets:

- a GnuPG home with an ed25519/cv25519 key made by batch generation, protected by a passphrase,
  and a gpg-agent (`allow-preset-passphrase`; the S2K count at its minimum, so that each
  decryption does not cost the agent's calibrated ~100 ms, let alone seconds on a loaded VM);
- a store made by the real `pass init` / `pass insert`;
- `unlock()` presets the passphrase (gpg-preset-passphrase), `lock()` reloads the agent (which
  forgets it), `stop_agent()` kills it: the three states the resolver must tell apart.

Every command runs as the owner (uid, gid, no other groups) with a clean environment. Cleanup
kills the agent and any process left running as the test user, then removes the user and files.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tests.support import user_keyrings
from tests.support.names import TEST_TAG

PRESET = "/usr/lib/gnupg/gpg-preset-passphrase"
TOOLS = ("gpg", "gpg-agent", "gpgconf", "pass", "useradd", "userdel")
ENTRY = b"hunter2\nlogin: alice\nurl: https://example.invalid/login\n"
LARGE = 40_000  # bytes: more than a key holds (32767)
TIMEOUT = 60


def missing() -> list[str]:
    """What this machine lacks for the pass tests."""
    lacking = [f"the '{t}' command" for t in TOOLS if shutil.which(t) is None]
    if not Path(PRESET).exists():
        lacking.append(f"{PRESET} (apt-get install gnupg)")
    if os.geteuid() != 0:
        lacking.append("root (a test user and its agent)")
    return lacking


class PassOwner:
    """One owner's GnuPG home, store and agent; commands run as that owner."""

    def __init__(self, pw: pwd.struct_passwd, base: Path) -> None:
        self.pw = pw
        self.base = base
        self.gnupg = base / ".gnupg"
        self.store = base / ".password-store"
        self.passphrase = secrets.token_urlsafe(12)
        self.fingerprint = ""
        self.keygrip = ""

    @property
    def uid(self) -> int:
        """The owner's uid."""
        return self.pw.pw_uid

    def env(self) -> dict[str, str]:
        """The environment of the owner's commands."""
        return {
            "HOME": str(self.base),
            "GNUPGHOME": str(self.gnupg),
            "PASSWORD_STORE_DIR": str(self.store),
            "PATH": "/usr/bin:/bin",
            "LC_ALL": "C",
        }

    def run(self, *argv: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run argv as the owner; raises with its stderr if it fails."""
        done = subprocess.run(
            list(argv), input=input, capture_output=True, env=self.env(), cwd=str(self.base),
            user=self.uid, group=self.pw.pw_gid, extra_groups=[], timeout=TIMEOUT, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode()}")
        return done

    def setup(self) -> None:
        """GnuPG home, agent, key and an initialised store."""
        self.gnupg.mkdir(mode=0o700)
        os.chown(self.gnupg, self.uid, self.pw.pw_gid)
        conf = self.gnupg / "gpg-agent.conf"
        conf.write_text("allow-preset-passphrase\ns2k-count 65536\n")
        os.chown(conf, self.uid, self.pw.pw_gid)
        self.start_agent()
        params = (
            "Key-Type: eddsa\nKey-Curve: ed25519\nKey-Usage: sign\nSubkey-Type: ecdh\n"
            "Subkey-Curve: cv25519\nSubkey-Usage: encrypt\nName-Real: kmskeys test\n"
            f"Name-Email: {self.pw.pw_name}@kmskeys.invalid\nExpire-Date: 0\n"
            f"Passphrase: {self.passphrase}\n%commit\n"
        )
        self.run(
            "gpg", "--batch", "--pinentry-mode", "loopback", "--gen-key", input=params.encode()
        )
        listing = self.run("gpg", "--batch", "--with-colons", "--with-keygrip", "-K").stdout
        rows = [line.split(":") for line in listing.decode().splitlines()]
        self.fingerprint = next(r[9] for r in rows if r[0] == "fpr")
        # The encryption subkey's keygrip: the last grp row (the primary key's comes first).
        self.keygrip = [r[9] for r in rows if r[0] == "grp"][-1]
        self.run("pass", "init", self.fingerprint)
        self.lock()

    def start_agent(self) -> None:
        """Start the owner's gpg-agent (as a daemon, outside any session)."""
        # Not through run(): the daemon keeps a captured stderr open, and run() would wait.
        subprocess.run(
            ["gpg-agent", "--daemon", "--homedir", str(self.gnupg)],
            env=self.env(), cwd=str(self.base), user=self.uid, group=self.pw.pw_gid,
            extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=TIMEOUT, check=True,
        )  # fmt: skip

    def agent_running(self) -> bool:
        """Whether the owner's agent answers (gpg-connect-agent exits 0 even when none runs)."""
        done = subprocess.run(
            ["gpg-connect-agent", "--no-autostart", "GETINFO pid", "/bye"],
            env=self.env(), user=self.uid, group=self.pw.pw_gid, extra_groups=[],
            capture_output=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        return done.stdout.startswith(b"D ")

    def start_agent_if_stopped(self) -> None:
        """Start the agent unless it runs."""
        if not self.agent_running():
            self.start_agent()

    def unlock(self) -> None:
        """Preset the key's passphrase in the agent: decryption needs no pinentry."""
        self.run(PRESET, "--preset", self.keygrip, input=self.passphrase.encode())

    def lock(self) -> None:
        """Make the agent forget every passphrase (a reload flushes its cache)."""
        self.run("gpgconf", "--reload", "gpg-agent")

    def stop_agent(self) -> None:
        """Kill the owner's agent (gpg's own way; the socket goes with it)."""
        subprocess.run(
            ["gpgconf", "--homedir", str(self.gnupg), "--kill", "gpg-agent"],
            env=self.env(), user=self.uid, group=self.pw.pw_gid, extra_groups=[],
            capture_output=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip

    def insert(self, name: str, content: bytes) -> Path:
        """`pass insert -m NAME` with `content`; the entry's file."""
        self.run("pass", "insert", "--multiline", "--force", name, input=content)
        return self.store / f"{name}.gpg"

    def populate(self) -> None:
        """The entries the tests read: a multi-line one, a large one, links and a foreign one."""
        # The owner field tells whose store answered.
        self.insert("email/work", ENTRY + f"owner: {self.pw.pw_name}\n".encode())
        self.insert("big", b"x" * LARGE)
        self.insert("empty-first", b"\nlogin: bob\n")
        outside = self.base / "outside"
        outside.mkdir(mode=0o700)
        os.chown(outside, self.uid, self.pw.pw_gid)
        target = self.insert("email/real", b"linked\n")
        moved = outside / "real.gpg"
        target.rename(moved)
        # pass would follow both links; kmskeys refuses them.
        self._link(self.store / "email" / "real.gpg", moved)
        self._link(self.store / "linkdir", outside)
        foreign = self.insert("foreign", b"not yours\n")
        os.chown(foreign, 65534, 65534)
        foreign.chmod(0o644)  # readable by the user: only the owner check stands in the way

    def _link(self, path: Path, target: Path) -> None:
        path.symlink_to(target)
        os.chown(path, self.uid, self.pw.pw_gid, follow_symlinks=False)


def _kill_user_processes(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` (the test user's own, nothing else)."""
    for _ in range(50):
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if entry.stat().st_uid == uid:
                        pids.append(int(entry.name))
                except OSError:
                    continue
        if not pids:
            return
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@contextmanager
def scratch() -> Iterator[Path]:
    """A directory below /tmp that other users may traverse (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix=f"{TEST_TAG}-pass-"))
    try:
        base.chmod(0o711)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def pass_owner(base: Path, pw: pwd.struct_passwd) -> Iterator[PassOwner]:
    """`pw`'s key, agent and populated store below `base` (an existing account, e.g. root)."""
    base.mkdir(mode=0o700, exist_ok=True)
    os.chown(base, pw.pw_uid, pw.pw_gid)
    owner = PassOwner(pw, base)
    try:
        owner.setup()
        owner.populate()
        yield owner
    finally:
        owner.stop_agent()


@contextmanager
def pass_user(base: Path) -> Iterator[PassOwner]:
    """A new test user whose home is `base/home`, with key, agent and store; removed after."""
    name = f"{TEST_TAG}-p-{secrets.token_hex(3)}"
    home = base / "home"
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(home),
         "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    pw = pwd.getpwnam(name)
    try:
        with pass_owner(home, pw) as owner:
            yield owner
    finally:
        _kill_user_processes(pw.pw_uid)
        user_keyrings.forget([pw.pw_uid])
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=TIMEOUT)
