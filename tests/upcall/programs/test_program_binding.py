"""Secrets bound to a program (issue 24), through the real upcall, the real resolver and real
cgroup v2 groups: `allow_units` admits one unit and refuses another of the same uid, the key is
read only in the requester's own keyrings, forged /proc/keys lines change no verdict, a killed
requester gets nothing, a herd in one unit makes one Decrypt, and a unit-bound blob decrypts
for its unit alone. docs/security.md, "Secrets bound to a program", says what this defends.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from kmskeys import keyutils
from kmskeys.blob import parse_blob
from kmskeys.contract import PROGRAM_ADMIN_KEY_PERM, PROGRAM_KEY_PERM
from resolver.pipeline import admin_group
from tests.support import cgroups
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy, ProxiedRequest
from tests.support.names import unique
from tests.support.requester import NOBODY, Requester, Resident
from tests.upcall.harness import Install, handler_pids, installed
from tests.upcall.programs.bound import SECRET, asking, in_unit, named_secret

pytestmark = pytest.mark.upcall

USERS = [0, NOBODY]
NO_KEY = (errno.ENOKEY, errno.EACCES)


def _own_key(install: Install, name: str) -> Callable[[], object]:
    """In the requester: its cached key as the hit path finds it (serial, describe string)."""

    def look() -> object:
        desc = install.description(name).encode()
        serial = keyutils.request_key(b"user", desc, None, 0)
        return {"serial": serial, "described": keyutils.keyctl_describe_alloc(serial).decode()}

    return look


def _reach(install: Install, name: str, serial: int) -> Callable[[], object]:
    """In another process: every way to the key, a value or an errno each."""

    def attempts() -> object:
        desc = install.description(name).encode()
        out: dict[str, object] = {}
        ways: dict[str, Callable[[], object]] = {
            "read": lambda: keyutils.keyctl_read(serial),
            "describe": lambda: keyutils.keyctl_describe_alloc(serial),
            "search": lambda: keyutils.keyctl_search(
                keyutils.KEY_SPEC_SESSION_KEYRING, b"user", desc, 0
            ),
            "link": lambda: keyutils.keyctl_link(serial, keyutils.KEY_SPEC_SESSION_KEYRING),
        }
        for way, call in ways.items():
            try:
                call()
                out[way] = "ok"
            except OSError as exc:
                out[way] = exc.errno
        return out

    return attempts


def _perm(described: str) -> tuple[int, int]:
    """(owner uid, perm) of a keyctl_describe string."""
    _type, uid, _gid, perm, _desc = described.split(";", 4)
    return int(uid), int(perm, 16)


def _program_perm() -> int:
    return PROGRAM_KEY_PERM if admin_group() is None else PROGRAM_ADMIN_KEY_PERM


@pytest.mark.parametrize("user", USERS, ids=["root", "nobody"])
def test_the_allowed_unit_gets_the_secret_in_a_key_no_other_program_of_its_uid_reaches(
    install: Install, cg: cgroups.Slice, requester: Requester, user: int
) -> None:
    name = named_secret(install)
    assert install.proxy is not None
    steps = [asking(install, name), _own_key(install, name)]
    with in_unit(cg, "app.service", user, requester.mode, steps) as app:
        assert app.run(0) == {"ok": SECRET.decode()}
        line = install.log.wait_for(name)
        assert (
            " outcome=ok " in line and f" unit=app.service cgroup={cg.path('app.service')} " in line
        )
        assert ",identify:" in line or " t=identify:" in line
        assert app.run(0) == {"ok": SECRET.decode()}  # a hit: no upcall, no line
        own = app.run(1)
        assert isinstance(own, dict) and "ok" in own, own
        serial = own["ok"]["serial"]
        # Owned by the requester's uid (the client's owner check passes), possessor bits only.
        assert _perm(own["ok"]["described"]) == (user, _program_perm())

        # Another program of the same uid, in another unit: the cached key is out of its
        # reach, by serial or by search, and it is refused before KMS.
        probes = [_reach(install, name, serial), asking(install, name)]
        with in_unit(cg, "other.service", user, requester.mode, probes) as other:
            reach = other.run(0)
            assert reach == {
                "ok": {"read": errno.EACCES, "describe": errno.EACCES, "search": errno.ENOKEY,
                       "link": errno.EACCES}
            }, reach  # fmt: skip
            assert other.run(1) == {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}
            refused = install.log.wait_for(name)
            why = "program policy (unit): unit other.service is not in allow_units"
            assert f'reason="{why}"' in refused
            assert " unit=other.service " in refused
        # The same unit in a session of its own: its own key (from the host cache, no second
        # Decrypt), and still no way to the first one's.
        with in_unit(cg, "app.service", user, requester.mode, probes[::-1]) as sibling:
            assert sibling.run(0) == {"ok": SECRET.decode()}
            assert " source=hostcache " in install.log.wait_for(name)
            assert sibling.run(1)["ok"]["read"] == errno.EACCES  # type: ignore[index]
    assert install.decrypts() == 1


def test_a_name_without_a_program_policy_pays_nothing(
    install: Install, cg: cgroups.Slice, requester: Requester
) -> None:
    """No identification, no requester in the line, the uid-owned mask: as before issue 24."""
    name = named_secret(install, "plain")
    steps = [asking(install, name), _own_key(install, name)]
    with in_unit(cg, "other.service", NOBODY, requester.mode, steps) as child:
        assert child.run(0) == {"ok": SECRET.decode()}
        line = install.log.wait_for(name)
        assert "identify" not in line and " unit=" not in line and " pid=" not in line
        described = child.run(1)["ok"]["described"]  # type: ignore[index]
        assert _perm(described)[1] & 0xFF000000 == 0  # possessors get nothing


def _forged_line(auth: int, target: int, uid: int, pid: int) -> bytes:
    """A /proc/keys line as the kernel prints an authorization key, naming `pid`."""
    return b"%08x I------     1 perm 1b010000 %5d %5d .request_ key:%x pid:%d ci:0" % (
        auth,
        uid,
        uid,
        target,
        pid,
    )


def _forge_for(requester_pid: int, named: int | None, description: bytes) -> Callable[[], object]:
    """A forger of the requester's uid: it watches /proc/keys for the authorization key of
    `requester_pid`'s request and, at once, adds a key (others may VIEW it) whose description
    forges that key's line naming `named` instead (None: the forger itself)."""

    def forge() -> object:
        needle = b" pid:%d " % requester_pid
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for line in Path("/proc/keys").read_bytes().split(b"\n"):
                fields = line.split()
                if b".request_" in fields and needle in line + b" ":
                    auth, target = int(fields[0], 16), int(fields[8][4:], 16)
                    pid = os.getpid() if named is None else named
                    forged = _forged_line(auth, target, keyutils.current_fsuid(), pid)
                    desc = description + b"\n" + forged + b"\n#"
                    serial = keyutils.add_key(
                        b"user", desc, b"x", keyutils.KEY_SPEC_SESSION_KEYRING
                    )
                    keyutils.keyctl_setperm(serial, 0x3F010001)  # possessor all; owner, other VIEW
                    return {"auth": auth, "serial": serial}
            time.sleep(0.0005)
        raise TimeoutError("no authorization key for the requester appeared")

    return forge


def _sleeper() -> object:
    return os.getpid()


@pytest.mark.parametrize("user", USERS, ids=["root", "nobody"])
@pytest.mark.parametrize("who", ["allowed", "refused"])
def test_a_forged_proc_keys_line_changes_no_verdict(
    install: Install, cg: cgroups.Slice, requester: Requester, user: int, who: str
) -> None:
    """Another program of the uid forges the authorization key's line while the resolver
    starts: naming itself beside the allowed unit's request (which still gets its secret), or
    naming the allowed unit's process beside its own request (still refused)."""
    name = named_secret(install)
    allowed = who == "allowed"
    asker, forging = (
        ("app.service", "other.service") if allowed else ("other.service", "app.service")
    )
    description = install.description(unique("forge")).encode()
    result: dict[str, object] = {}
    with Resident(user, _sleeper, mode=requester.mode) as bystander:  # type: ignore[arg-type]
        cg.move(bystander.pid, cg.path("app.service"))
        with in_unit(cg, asker, user, requester.mode, [asking(install, name)]) as child:
            forge = _forge_for(child.pid, None if allowed else bystander.pid, description)
            with in_unit(cg, forging, user, requester.mode, [forge]) as forger:
                watching = threading.Thread(target=lambda: result.update(forged=forger.run(0)))
                watching.start()
                time.sleep(0.2)  # the forger is polling
                got = child.run(0)
                watching.join(timeout=30)
    forged = result["forged"]
    assert isinstance(forged, dict) and "ok" in forged, forged
    line = install.log.wait_for(name)
    assert " auth_lines=2 " in line, f"the forgery was not in place in time: {line}"
    if who == "allowed":
        assert got == {"ok": SECRET.decode()}
        assert " outcome=ok " in line and f" pid={child.pid} " in line
    else:
        assert got == {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}
        assert "program policy (unit): unit other.service is not in allow_units" in line
        assert install.decrypts() == 0


@pytest.mark.parametrize("user", USERS, ids=["root", "nobody"])
def test_a_requester_killed_during_resolution_gets_no_key_and_leaves_nothing(
    install: Install, cg: cgroups.Slice, requester: Requester, user: int
) -> None:
    assert install.proxy is not None
    name = named_secret(install)
    arrived, release = threading.Event(), threading.Event()

    def hold(request: ProxiedRequest) -> None:
        if request.operation == "Decrypt":
            arrived.set()
            release.wait(timeout=10)

    install.proxy.set_fault(hold)  # type: ignore[arg-type]
    result: dict[str, object] = {}
    try:
        with in_unit(cg, "app.service", user, requester.mode, [asking(install, name)]) as child:
            waiting = threading.Thread(target=lambda: result.update(got=child.run(0)))
            waiting.start()
            assert arrived.wait(timeout=15), "the resolver never asked KMS"
            os.kill(child.pid, signal.SIGKILL)
            time.sleep(0.1)
            release.set()
            waiting.join(timeout=30)
    finally:
        release.set()
    assert result["got"] == {"error": "ChildDied"}
    line = install.log.wait_for(name)
    assert " outcome=gone " in line and " errno=EAGAIN " in line, line
    assert "is exiting (killed)" in line
    # Nothing left: no handler, and the key (negative, or gone with its keyring) holds nothing.
    deadline = time.monotonic() + 5
    while handler_pids(install.config) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handler_pids(install.config) == []
    serial = int(line.split(" key=")[1].split()[0])
    try:
        keyutils.keyctl_read(serial)
        left = "readable"
    except OSError as exc:
        left = errno.errorcode[exc.errno]
    assert left in ("ENOKEY", "EACCES", "EKEYREJECTED", "EAGAIN"), left


def test_a_herd_in_one_unit_makes_one_decrypt(
    install: Install, cg: cgroups.Slice, requester: Requester
) -> None:
    """Four processes of the unit, each in a session of its own (four upcalls, the host cache
    coalesces them), eight threads each (one upcall per session): one Decrypt."""
    name = named_secret(install)
    get = asking(install, name)

    def herd() -> object:
        barrier = threading.Barrier(8)
        got: list[object] = []

        def one() -> None:
            barrier.wait()
            got.append(get())

        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        return got

    outcomes: list[object] = [None] * 4
    with ExitStack() as stack:
        children = [
            stack.enter_context(in_unit(cg, "app.service", NOBODY, requester.mode, [herd]))
            for _ in range(4)
        ]
        runs = [
            threading.Thread(target=lambda i=i, c=c: outcomes.__setitem__(i, c.run(0)))
            for i, c in enumerate(children)
        ]
        for run in runs:
            run.start()
        for run in runs:
            run.join(timeout=60)
    assert outcomes == [{"ok": [SECRET.decode()] * 8}] * 4
    assert install.decrypts() == 1


@pytest.mark.parametrize("user", USERS, ids=["root", "nobody"])
def test_a_unit_bound_blob_decrypts_for_its_unit_alone(
    install: Install, cg: cgroups.Slice, requester: Requester, user: int
) -> None:
    """The blob binds app.service whatever the policy says (this name has none): KMS gets the
    unit the resolver reads from the requester's cgroup, and refuses any other."""
    name = unique("unitblob")
    text = install.blob(SECRET, name, unit="app.service")
    install.deploy(name, text)
    assert parse_blob(text).unit == "app.service"
    steps = [asking(install, name), _own_key(install, name)]
    with in_unit(cg, "app.service", user, requester.mode, steps) as app:
        assert app.run(0) == {"ok": SECRET.decode()}
        assert " unit=app.service " in install.log.wait_for(name)
        assert _perm(app.run(1)["ok"]["described"]) == (user, _program_perm())  # type: ignore[index]
    assert install.decrypts() == 1
    with in_unit(cg, "other.service", user, requester.mode, [asking(install, name)]) as other:
        assert other.run(0) == {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}
    assert "blob was encrypted for unit 'app.service', not 'other.service'" in install.log.wait_for(
        name
    )
    assert install.decrypts() == 1  # refused locally: the blob records its unit

    # Its version-1 form records no unit: the resolver cannot check locally, KMS refuses.
    install.deploy(name, parse_blob(text).identity())
    with in_unit(cg, "other.service", user, requester.mode, [asking(install, name)]) as other:
        assert other.run(0) == {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}
    assert "InvalidCiphertextException" in install.log.wait_for(name)
    assert install.decrypts() == 2

    # A requester in no unit at all (a plain cgroup): refused before KMS.
    plain = cg.sub(f"/{cg.name}", "plain")
    with in_unit(cg, plain, user, requester.mode, [asking(install, name)]) as nowhere:
        assert nowhere.run(0) == {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}
    assert "the requester has none" in install.log.wait_for(name)
    assert install.decrypts() == 2


def test_a_key_is_linked_only_where_its_requester_alone_finds_it(
    install: Install, cg: cgroups.Slice, requester: Requester
) -> None:
    """keyring="user" (every program of the uid searches it) and a session keyring inherited
    from root (su/runuser without a new session: root's other children share it) refuse."""
    name = named_secret(install)
    with in_unit(
        cg, "app.service", NOBODY, requester.mode, [asking(install, name, keyring="user")]
    ) as app:
        assert app.run(0) == {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}
    line = install.log.wait_for(name)
    assert "is not the requester's own thread, process or session keyring" in line, line
    assert install.decrypts() == 0

    name = named_secret(install)
    inherit = in_unit(
        cg, "app.service", NOBODY, requester.mode, [asking(install, name)], session="inherit"
    )
    with inherit as app:
        assert app.run(0) == {"error": "KeyRejectedError", "errno": errno.EKEYREJECTED}
    line = install.log.wait_for(name)
    assert f"belongs to uid 0, not the requester's {NOBODY}" in line, line
    assert install.decrypts() == 0


def test_an_executable_replaced_before_its_request_does_not_pass(
    kms_backend: tuple[KmsEmulator, KmsProxy, str], tmp_path: Path, session_keyring: object
) -> None:
    """allow_exe: a program whose file is replaced while it runs (stopped right after exec,
    then resumed) is no longer that program; the same program untouched passes."""
    import shutil
    import subprocess

    from tests.support.ptrace import resume, start_stopped

    keyctl = shutil.which("keyctl")
    assert keyctl is not None, "keyctl(1) is needed (apt-get install keyutils)"
    where = tmp_path / "bin"
    where.mkdir(mode=0o755)
    program = where / "kmst-keyctl"
    shutil.copy2(keyctl, program)
    policy = f'\n[names."kmst-*-pbexe-*"]\nallow_exe = ["{program}"]\n'
    emulator, proxy, key_arn = kms_backend
    with installed(emulator, proxy, key_arn, names=policy) as install:

        def ask(name: str) -> subprocess.Popen[bytes]:
            # In the test's own session keyring (root's, as the requester is).
            return start_stopped(
                [str(program), "request2", "user", install.description(name), "", "@s"]
            )

        same = named_secret(install, "pbexe")
        process = ask(same)
        resume(process.pid)
        assert process.wait(timeout=30) == 0
        assert f" exe={program} " in install.log.wait_for(same)

        swapped = named_secret(install, "pbexe")
        process = ask(swapped)
        os.replace(shutil.copy2(keyctl, where / "other"), program)
        resume(process.pid)
        assert process.wait(timeout=30) != 0
        line = install.log.wait_for(swapped)
        assert "program policy (exe)" in line and f"{program} (deleted)" in line, line
