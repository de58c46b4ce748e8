"""What the `kmskeys exec --watch` tests share: the command they run and how they watch it.

The command is a small Python program (CHILD) that prints one JSON line per event: its start,
each signal it gets (HUP, USR1, TERM), with what it sees then (its credential file, its
environment, the directory's listing and modes, and every distinct value a reader thread saw in
the file while it was being replaced).
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.names import unique
from tests.upcall.harness import KMSKEYS, Install

INTERVAL = "0.2"
WAIT = 30.0  # for an event that must come: a loaded 2-vCPU machine starts Pythons slowly

CHILD = r"""
import json, os, signal, stat, sys, threading, time
opts = dict(arg.split("=", 1) for arg in sys.argv[1:])
where, name, var = os.environ.get("CREDENTIALS_DIRECTORY"), opts.get("file"), opts.get("var")
seen = set()

def read():
    with open(os.path.join(where, name), "rb") as f:
        return f.read().hex()

def spin():
    while True:
        try:
            seen.add(read())
        except OSError as exc:
            seen.add("error: " + exc.strerror)
        time.sleep(0.0005)

def report(event):
    out = {"event": event, "t": time.monotonic(), "pid": os.getpid(), "ppid": os.getppid()}
    out["seen"] = sorted(seen)
    if var:
        out["env"] = os.environ.get(var)
    if where:
        st = os.stat(where)
        out["dir_mode"], out["files"] = stat.S_IMODE(st.st_mode), sorted(os.listdir(where))
    if where and name:
        try:
            out["value"] = read()
            out["file_mode"] = stat.S_IMODE(os.stat(os.path.join(where, name)).st_mode)
        except OSError as exc:
            out["value"] = "error: " + exc.strerror
    print(json.dumps(out), flush=True)

def term(*_):
    report("term")
    os._exit(int(opts.get("exit", "0")))

def usr2(*_):
    if opts.get("usr2") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(int(opts.get("usr2", "0")))

signal.signal(signal.SIGHUP, lambda *_: report("hup"))
signal.signal(signal.SIGUSR1, lambda *_: report("usr1"))
signal.signal(signal.SIGTERM, term)
signal.signal(signal.SIGUSR2, usr2)
if "spin" in opts:
    threading.Thread(target=spin, daemon=True).start()
report("start")
while True:
    signal.pause()
"""


class Watching:
    """`kmskeys exec --prefix P --watch ARGS -- python CHILD CHILD_ARGS`, its events and stderr."""

    def __init__(self, install: Install, args: list[str], child: list[str]) -> None:
        argv = [str(KMSKEYS), "exec", "--prefix", install.prefix, "--watch", *args]
        argv += ["--", sys.executable, "-c", CHILD, *child]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.errors: list[str] = []
        threading.Thread(target=self._read_events, daemon=True).start()
        threading.Thread(target=self._read_errors, daemon=True).start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:  # a hook's plain line: its first word names the event
                words = line.decode().split()
                self.events.put({"event": words[0] if words else "", "words": words})

    def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        self.errors.extend(line.decode() for line in self.proc.stderr)

    def next(self, kind: str, timeout: float = WAIT) -> dict[str, Any]:
        """The next event of this kind (earlier events of other kinds are kept in `seen`)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(event)
            if event["event"] == kind:
                return event
        raise AssertionError(f"no {kind!r} event in {timeout} s; seen {self.seen}; {self.errors}")

    def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Every event within `seconds` (expected: none)."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.events.get(timeout=left))
            except queue.Empty:
                break
        return got

    def wait(self, timeout: float = WAIT) -> int:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.1)  # the stderr reader's last line
        return code

    def __enter__(self) -> Watching:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # forwarded to the command, which exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the command gets SIGTERM (PR_SET_PDEATHSIG)
                self.proc.wait(timeout=10)


def deployed(install: Install, count: int) -> list[tuple[str, bytes]]:
    """`count` names with blobs in the install's blob_dir, and their secrets."""
    pairs = [(unique(), unique("v1").encode()) for _ in range(count)]
    for name, secret in pairs:
        install.deploy(name, install.blob(secret, name))
    return pairs


def rotate(install: Install, name: str, blob: str, *, shared: bool = False) -> None:
    """Deploy `blob` as NAME's and flush NAME host-wide, as root does after a rotation: in a
    session keyring of its own (as a root shell or an SSM command has), or this test's."""
    install.deploy(name, blob)
    session = [] if shared else ["keyctl", "session", "-"]
    argv = [*session, str(KMSKEYS), "flush", name, "--prefix", install.prefix]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def no_secret_in(text: str, *secrets: bytes) -> bool:
    return not any(s.decode() in text or s.hex() in text for s in secrets)


def proc_text(pid: int, what: str) -> str:
    raw = Path(f"/proc/{pid}/{what}").read_bytes()
    return raw.decode(errors="replace") + raw.hex()
