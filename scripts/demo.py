"""`make demo`: the whole kmskeys chain on this machine, against a local KMS emulator.

A KMS key in the emulator; `kmskeys encrypt` as CI would run it; `kmskeys-resolver install`
under the demo prefix; the CGI example under a real lighttpd; `kmskeys show`, cache hits,
`kmskeys flush` and the re-resolution after a rotation; then everything is removed again.
Only fingerprints of the secrets are printed. Exit status 0 means every step really worked.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kmskeys import Keyring  # noqa: E402
from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator  # noqa: E402
from tests.support.kms_proxy import KmsProxy  # noqa: E402
from tests.support.lighttpd import EXAMPLE_CONF, Lighttpd  # noqa: E402

DEFAULT_PREFIX = "kmsdemo"
NAME = "db-password"
CGI_SCRIPT = ROOT / "examples" / "cgi" / "secret.py"
CGI_PAGE = CGI_SCRIPT.with_name("secret_page.py")  # the page secret.py imports
BIN = Path(sys.executable).parent
KMSKEYS, RESOLVER = BIN / "kmskeys", BIN / "kmskeys-resolver"
HIT_REQUESTS = 20
STEPS = 7
INDENT = "      "


class DemoError(Exception):
    """A step did not do what it should; the message says what was seen."""


class Step:
    """The running step: what it is doing now (for the progress line) and its result line."""

    def __init__(self) -> None:
        self.doing = ""
        self.result = ""


class Steps:
    """Numbered steps with their timing; a progress line each `tick` seconds a step runs."""

    def __init__(self, total: int, tick: float = 1.0) -> None:
        self.total = total
        self.tick = tick
        self.number = 0

    @contextmanager
    def step(self, title: str) -> Iterator[Step]:
        """Announce, time and report one step; a failure propagates after saying so."""
        self.number += 1
        print(f"[{self.number}/{self.total}] {title}", flush=True)
        current, done = Step(), threading.Event()
        start = time.monotonic()

        def progress() -> None:
            while not done.wait(self.tick):
                doing = f" ({current.doing})" if current.doing else ""
                print(f"{INDENT}... {time.monotonic() - start:.0f} s{doing}", flush=True)

        ticker = threading.Thread(target=progress, daemon=True)
        ticker.start()
        try:
            yield current
        except BaseException:
            done.set()
            ticker.join()
            print(f"{INDENT}FAILED after {time.monotonic() - start:.2f} s", flush=True)
            raise
        done.set()
        ticker.join()
        print(f"{INDENT}ok {time.monotonic() - start:.2f} s  {current.result}", flush=True)


def fingerprint(secret: bytes) -> str:
    """What the CGI page shows: the first 16 hex digits of the secret's sha256."""
    return hashlib.sha256(secret).hexdigest()[:16]


def run(argv: list[str], stdin: bytes | None = None) -> str:
    """Run a command of this installation; its stdout, or DemoError with its stderr."""
    env = {**os.environ, **TEST_CREDENTIALS}
    done = subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=120, check=False)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise DemoError(f"`{' '.join(argv[:2])} ...` exited {done.returncode}: {err}")
    return done.stdout.decode(errors="replace")


class SyslogSocket:
    """A unix datagram socket the resolver's config points at: the demo shows its lines."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.fspath(path))
        self.sock.settimeout(5.0)

    def next_line(self) -> str:
        """The next line the resolver logged, without its syslog header."""
        try:
            data = self.sock.recv(65536).decode("utf-8", "replace")
        except TimeoutError:
            raise DemoError("the resolver logged nothing within 5 s") from None
        return data.split("]: ", 1)[-1]

    def close(self) -> None:
        self.sock.close()


class Demo:
    """The demo's state, so that cleanup removes exactly what the steps created."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.rule = Path("/etc/request-key.d") / f"kmskeys-{prefix}.conf"
        self.steps = Steps(STEPS)
        self.tmp = Path(tempfile.mkdtemp(prefix="kmsdemo-"))
        self.config = self.tmp / "resolver.toml"
        self.blob_dir = self.tmp / "secrets"
        self.emulator: KmsEmulator | None = None
        self.proxy: KmsProxy | None = None
        self.web: Lighttpd | None = None
        self.log: SyslogSocket | None = None
        self.installed = False
        self.key_arn = ""

    # -- steps ----------------------------------------------------------------------------------

    def start_kms(self, step: Step) -> None:
        step.doing = "starting the moto server"
        self.emulator = KmsEmulator(log=self.tmp / "emulator.log").start()
        # A counting proxy in front of the emulator: it shows how many Decrypts reach KMS.
        self.proxy = KmsProxy(self.emulator.url).start()
        step.doing = "creating a key"
        meta = self.emulator.client().create_key(Description="kmskeys demo")["KeyMetadata"]
        self.key_arn = meta["Arn"]
        step.result = f"emulator {self.emulator.url}, key {meta['KeyId']}"

    def encrypt(self, step: Step, secret: bytes) -> None:
        assert self.proxy is not None
        step.doing = "kmskeys encrypt (imports boto3, calls KMS Encrypt)"
        self.blob_dir.mkdir(mode=0o755, exist_ok=True)
        blob = self.blob_dir / f"{NAME}.kms"
        argv = [str(KMSKEYS), "encrypt", NAME, "--key-id", self.key_arn]
        argv += ["--region", TEST_CREDENTIALS["AWS_REGION"], "--endpoint-url", self.proxy.url]
        run([*argv, "--output", str(blob)], stdin=secret)
        os.chmod(blob, 0o644)
        text = blob.read_text().strip()
        if not text or secret.decode() in text:
            raise DemoError(f"{blob} does not look like a blob")
        step.result = (
            f"secret sha256 {fingerprint(secret)} from stdin -> {blob.name}, {len(text)} chars"
        )

    def install(self, step: Step) -> None:
        assert self.proxy is not None
        credentials = self.tmp / "credentials"
        root_file(
            credentials,
            "[default]\n"
            f"aws_access_key_id = {TEST_CREDENTIALS['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {TEST_CREDENTIALS['AWS_SECRET_ACCESS_KEY']}\n",
            0o600,
        )
        self.log = SyslogSocket(self.tmp / "log.sock")
        root_file(
            self.config,
            f'prefix = "{self.prefix}"\n'
            f'region = "{TEST_CREDENTIALS["AWS_REGION"]}"\n'
            f'endpoint_url = "{self.proxy.url}"\n'
            f'shared_credentials_file = "{credentials}"\n'
            f'blob_dir = "{self.blob_dir}"\n'
            f'state_dir = "{self.tmp / "state"}"\n'
            f'syslog_socket = "{self.tmp / "log.sock"}"\n'
            "ttl = 300\nnegative_ttl = 5\ndeadline = 8\n",
            0o644,
        )
        config, prefix, key = str(self.config), self.prefix, self.key_arn
        out = run(
            [str(RESOLVER), "install", "--config", config, "--prefix", prefix, "--key-arn", key]
        )
        self.installed = True
        rule = next((line for line in out.splitlines() if "request-key.d" in line), out.strip())
        step.result = f"{rule}; config {self.config}"

    def serve(self, step: Step, secret: bytes) -> None:
        assert self.proxy is not None and self.log is not None
        step.doing = "starting lighttpd"
        docroot = self.tmp / "www"
        docroot.mkdir(mode=0o755)
        shutil.copy(CGI_SCRIPT, docroot / CGI_SCRIPT.name)
        shutil.copy(CGI_PAGE, docroot / CGI_PAGE.name)
        self.web = Lighttpd(
            EXAMPLE_CONF,
            self.tmp / "lighttpd",
            docroot=docroot,
            python=sys.executable,
            prefix=self.prefix,
            secret=NAME,
        ).start()
        self.proxy.reset_counts()
        step.doing = "first request: the kernel upcalls the resolver"
        page = self.fetch()
        self.expect(page, secret, decrypts=1)
        print(f"{INDENT}resolver log: {self.log.next_line()}")
        step.result = (
            f"{self.web.url}/{CGI_SCRIPT.name} -> sha256 {page['fingerprint']} (matches), "
            f"{page['size']} bytes; KMS Decrypt calls: 1"
        )

    def hits(self, step: Step, secret: bytes) -> None:
        shown = run([str(KMSKEYS), "show", "--prefix", self.prefix])
        if NAME not in shown:
            raise DemoError(f"kmskeys show does not list {NAME}: {shown!r}")
        for line in shown.rstrip().splitlines():
            print(f"{INDENT}| {line}")
        step.doing = f"{HIT_REQUESTS} more requests"
        walls, insides = [], []
        for _ in range(HIT_REQUESTS):
            start = time.perf_counter()
            page = self.fetch()
            walls.append((time.perf_counter() - start) * 1000)
            insides.append(float(page["us"]))
            self.expect(page, secret, decrypts=1)
        step.result = (
            f"{HIT_REQUESTS} requests, KMS Decrypt calls still 1; per request "
            f"{statistics.median(walls):.0f} ms (a new process), get_secret "
            f"{statistics.median(insides):.0f} µs (median)"
        )

    def flush(self, step: Step, old: bytes, new: bytes) -> None:
        assert self.log is not None
        step.doing = "rotating: kmskeys encrypt of a new secret"
        self.encrypt(Step(), new)
        page = self.fetch()
        self.expect(page, old, decrypts=1)  # still the cached secret: nothing asked KMS
        print(f"{INDENT}new blob deployed; the page still shows the cached {page['fingerprint']}")
        run([str(KMSKEYS), "flush", NAME, "--prefix", self.prefix])
        wait_until_collected(f"{self.prefix}:{NAME}")
        page = self.fetch()
        self.expect(page, new, decrypts=2)
        print(f"{INDENT}resolver log: {self.log.next_line()}")
        step.result = (
            f"kmskeys flush {NAME} -> next request re-resolved: sha256 {page['fingerprint']} "
            "(the new secret); KMS Decrypt calls: 2"
        )

    def check_uninstalled(self) -> None:
        if self.rule.exists():
            raise DemoError(f"{self.rule} is still there")

    # -- helpers --------------------------------------------------------------------------------

    def fetch(self) -> dict[str, str]:
        """GET the CGI page; its fields (fingerprint, size, us, pid)."""
        assert self.web is not None
        status, body = self.web.fetch(f"/{CGI_SCRIPT.name}")
        fields = dict(re.findall(r'id="(\w+)">([^<]*)<', body))
        if status != 200 or "fingerprint" not in fields:
            raise DemoError(
                f"HTTP {status}: {body.strip()[:200]!r}; lighttpd log: {self.web.log()}"
            )
        return fields

    def expect(self, page: dict[str, str], secret: bytes, decrypts: int) -> None:
        """The page shows `secret`'s fingerprint and KMS saw `decrypts` Decrypt calls."""
        assert self.proxy is not None
        if page["fingerprint"] != fingerprint(secret):
            raise DemoError(f"page shows {page['fingerprint']}, expected {fingerprint(secret)}")
        seen = self.proxy.count("Decrypt")
        if seen != decrypts:
            raise DemoError(f"KMS saw {seen} Decrypt calls, expected {decrypts}")

    def cleanup(self) -> list[str]:
        """Undo every step that ran; the problems met on the way (empty when all went well)."""
        actions: list[tuple[str, Callable[[], object]]] = []
        if self.web is not None:
            actions.append(("stop lighttpd", self.web.stop))
        if self.installed:
            actions.append(
                (
                    "kmskeys-resolver uninstall",
                    lambda: run([str(RESOLVER), "uninstall", "--config", str(self.config)]),
                )
            )
            actions.append(("check the request-key rule is gone", self.check_uninstalled))
        if self.proxy is not None:
            actions.append(("stop the proxy", self.proxy.stop))
        if self.emulator is not None:
            actions.append(("stop the emulator", self.emulator.stop))
        if self.log is not None:
            actions.append(("close the log socket", self.log.close))
        actions.append(("empty the demo's session keyring", lambda: Keyring.session().clear()))
        actions.append(("remove temp files", lambda: shutil.rmtree(self.tmp)))
        return undo_all(actions)


def undo_all(actions: list[tuple[str, Callable[[], object]]]) -> list[str]:
    """Run every (what, action) in turn, whatever fails; the failures as "what: error"."""
    problems = []
    for what, action in actions:
        try:
            action()
        except Exception as exc:
            problems.append(f"{what}: {exc}")
    return problems


def wait_until_collected(description: str, timeout: float = 5.0) -> None:
    """Wait until the kernel's key GC has removed the flushed key from /proc/keys.

    Until then a request for it fails with EKEYREVOKED instead of asking the resolver again.
    """
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/keys") as lines:
            fields = [line.rstrip("\n").split(None, 8) for line in lines]
        described = [f[8] for f in fields if len(f) == 9]
        if not any(d == description or d.startswith(description + ": ") for d in described):
            return
        if time.monotonic() > deadline:
            raise DemoError(f"{description} still cached {timeout:.0f} s after kmskeys flush")
        time.sleep(0.005)


def root_file(path: Path, text: str, mode: int) -> None:
    """Write a root-owned file with `mode`, as the resolver insists for its config."""
    path.write_text(text)
    os.chown(path, 0, 0)
    os.chmod(path, mode)


def preflight() -> list[str]:
    """What this machine lacks for the demo."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the resolver install writes /etc/request-key.d)")
    if not Path("/sbin/request-key").exists():
        missing.append("/sbin/request-key (apt-get install keyutils)")
    if shutil.which("lighttpd") is None and not Path("/usr/sbin/lighttpd").exists():
        missing.append("lighttpd (apt-get install lighttpd)")
    missing += [f"{p} (pip install -e '.[dev]')" for p in (KMSKEYS, RESOLVER) if not p.exists()]
    return missing


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the seven steps; clean up whatever happened; 0 only if everything worked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help="the demo install's prefix (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    missing = preflight()
    if missing:
        print("make demo cannot run here; missing: " + "; ".join(missing), file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    print("kmskeys demo: the whole chain on this machine, against a local KMS emulator")
    # lighttpd, its CGI children and the `kmskeys` commands below all inherit this session
    # keyring, so they share the key the resolver caches (systemd: the service's keyring).
    Keyring.join_session()
    started = time.monotonic()
    demo = Demo(args.prefix)
    steps = demo.steps
    v1, v2 = secrets.token_urlsafe(24).encode(), secrets.token_urlsafe(24).encode()

    def body() -> None:
        with steps.step("create a KMS key in the emulator (moto server on 127.0.0.1)") as s:
            demo.start_kms(s)
        with steps.step(f"kmskeys encrypt {NAME}: the secret on stdin, as CI would") as s:
            demo.encrypt(s, v1)
        with steps.step(
            f"kmskeys-resolver install --prefix {args.prefix} (root-owned config)"
        ) as s:
            demo.install(s)
        with steps.step("the CGI example under lighttpd: first request resolves") as s:
            demo.serve(s, v1)
        with steps.step("kmskeys show, then cache hits") as s:
            demo.hits(s, v1)
        with steps.step("rotate the secret, kmskeys flush, re-resolution") as s:
            demo.flush(s, v1, v2)

    return run_demo(
        steps,
        body,
        cleanup_title="clean up: lighttpd, resolver install, emulator, temp files",
        cleanup=demo.cleanup,
        started=started,
    )


def run_demo(
    steps: Steps,
    body: Callable[[], None],
    *,
    cleanup_title: str,
    cleanup: Callable[[], list[str]],
    started: float,
    note: str = "",
) -> int:
    """Run the steps in `body`, then always `cleanup` as the last step; 0 only if all worked."""
    ok = False
    problems: list[str] = []
    try:
        body()
        ok = True
    except DemoError as exc:
        print(f"{INDENT}{exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{INDENT}interrupted", file=sys.stderr)
    except Exception:
        traceback.print_exc()
    finally:
        steps.number = steps.total - 1  # cleanup is always the last step, whichever step failed
        with steps.step(cleanup_title) as s:
            problems = cleanup()
            s.result = "nothing left behind" if not problems else "; ".join(problems)
    took = time.monotonic() - started
    if ok and not problems:
        print(f"demo OK: {steps.total} steps in {took:.1f} s{note}")
        return 0
    print(f"demo FAILED after {took:.1f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
