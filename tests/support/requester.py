"""Run a callable as another user: the one way every tier does it.

Two kinds of requester, both forked children that report a JSON-able result to the parent:

- `setuid`: every id dropped to the user's (`kmskeys.upcall_probe.become_user`), a real
  unprivileged process. Some hosts refuse request-key upcalls for such a process (request_key
  fails with ENOENT and /sbin/request-key never runs), so its misses cannot be tested there.
- `fsuid`: euid 0 with fsuid/fsgid set to the user's (`become_fsuid`), and the real uid too
  when the session probe shows such a requester still upcalls. For the keyring this is the
  user: the kernel takes %u/%g, a new key's owner, the key quota and every key permission
  check from the fsuid, and the user/user-session keyrings and a new session keyring's owner
  from the real uid. It is not the user for anything else: CAP_SYS_ADMIN stays (so
  KEYCTL_SETPERM and KEYCTL_CHOWN work on keys it does not own, as they would for root), the
  euid is 0 (SO_PEERCRED, /proc ownership, KEYCTL_GET_PERSISTENT of uid 0), and a program it
  executes is root again (execve resets the fsuid to the euid). Code that needs a real non-root
  euid for those asks for `mode="setuid"`.

The session probe (`capabilities()`, once per run, printed in the pytest header) decides which
kinds work here. `requester_modes()` lists the kinds the keyring tests run under: both where
both can upcall, so that the emulation stays exercised on hosts that do not need it.
`KMSKEYS_TEST_REQUESTER=fsuid` (or `setuid`) forces one kind. docs/reliability.md has the
kernel facts behind all this, each checked on the suite's kernel.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import BinaryIO, Literal

from kmskeys.upcall_probe import (
    UpcallCapabilities,
    UpcallOutcome,
    become_fsuid,
    become_user,
    probe_upcalls,
)
from tests.support.imds_guard import own_network
from tests.support.names import unique_prefix
from tests.support.reach import reach_checkout

Mode = Literal["setuid", "fsuid"]
Session = Literal["new", "inherit"]
User = pwd.struct_passwd | str | int
MODES: tuple[Mode, ...] = ("setuid", "fsuid")
FORCE_ENV = "KMSKEYS_TEST_REQUESTER"
# Developer knob: the setuid child keeps these capabilities (effective and ambient), e.g.
# `sys_admin`, the capability that hosts refusing non-root upcalls have been seen to require:
# a way to run the setuid path end to end on such a host. Off in `make test`.
KEEP_CAPS_ENV = "KMSKEYS_TEST_SETUID_CAPS"
_CAP_BITS = {"sys_admin": 21}

NOBODY = 65534
PROBE_TIMEOUT = 5.0


def entry(user: User) -> pwd.struct_passwd:
    """The passwd entry of a user given by entry, name or uid."""
    if isinstance(user, pwd.struct_passwd):
        return user
    return pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)


def _kept_caps() -> list[int]:
    listed = os.environ.get(KEEP_CAPS_ENV, "").split(",")
    names = [n.strip().lower().removeprefix("cap_") for n in listed if n.strip()]
    unknown = [n for n in names if n not in _CAP_BITS]
    if unknown:
        raise ValueError(f"{KEEP_CAPS_ENV}: unknown capabilities {unknown}; known: {_CAP_BITS}")
    return [_CAP_BITS[n] for n in names]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _become_user_keeping(uid: int, gid: int, caps: list[int]) -> None:
    """become_user(), then hold `caps` (effective, inheritable and ambient) and no others."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_keepcaps, pr_cap_ambient, pr_cap_ambient_raise = 8, 47, 2
    if libc.prctl(pr_set_keepcaps, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    become_user(uid, gid)
    mask = sum(1 << bit for bit in caps)
    data = (_CapData * 2)()
    for i in (0, 1):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = part
    if libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data) != 0:  # _LINUX_CAPABILITY_V3
        raise OSError(ctypes.get_errno(), "capset")
    for bit in caps:
        if libc.prctl(pr_cap_ambient, pr_cap_ambient_raise, bit, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAP_AMBIENT_RAISE)")


def _setuid(uid: int, gid: int) -> None:
    caps = _kept_caps()
    # Root keeps every capability: a root child (as_user("root")) may start user children.
    if caps and uid != 0:
        _become_user_keeping(uid, gid, caps)
    else:
        become_user(uid, gid)


@cache
def capabilities() -> UpcallCapabilities | str:
    """This host's upcall capabilities, probed once per run; a string says why it could not be.

    The non-root case is the setuid child exactly as this module makes it (with any
    KMSKEYS_TEST_SETUID_CAPS), so the answer is the one the tests will meet.
    """
    if os.geteuid() != 0:
        return "not probed: the probe needs root to write its rule"
    try:
        caps = probe_upcalls(PROBE_TIMEOUT, prefix=unique_prefix(), become_non_root=_setuid)
    except Exception as exc:
        return f"not probed: {type(exc).__name__}: {exc}"
    return caps


def _emulate_real_uid() -> bool:
    caps = capabilities()
    return isinstance(caps, UpcallCapabilities) and caps.ruid_fsuid.works


def _works(mode: Mode) -> bool:
    caps = capabilities()
    if not isinstance(caps, UpcallCapabilities):
        return False
    return caps.non_root.works if mode == "setuid" else caps.fsuid.works or caps.ruid_fsuid.works


def forced_mode() -> Mode | None:
    """The kind KMSKEYS_TEST_REQUESTER forces, if any."""
    forced = os.environ.get(FORCE_ENV, "").strip()
    if not forced:
        return None
    if forced not in MODES:
        raise ValueError(f"{FORCE_ENV}={forced!r}: expected one of {', '.join(MODES)}")
    return forced  # type: ignore[return-value]


def requester_modes() -> list[Mode]:
    """The kinds of requester the keyring tests run under in this session (never empty)."""
    forced = forced_mode()
    if forced:
        return [forced]
    working = [mode for mode in MODES if _works(mode)]
    # Nothing works (or no probe as non-root): the tier's prerequisites fail it, saying why.
    return working or ["setuid"]


def default_mode() -> Mode:
    """The kind `as_user` uses when not told: a real setuid child wherever it can upcall."""
    return requester_modes()[0]


def missing() -> list[str]:
    """What keeps this session from running requesters that can upcall (for the prereqs)."""
    caps = capabilities()
    if not isinstance(caps, UpcallCapabilities):
        return [f"the upcall probe ({caps})"]
    if not caps.root.works:
        return [f"a root requester whose miss runs /sbin/request-key (probe: {caps.root})"]
    forced = forced_mode()
    if forced and not _works(forced):
        return [f"{FORCE_ENV}={forced}, but that requester cannot upcall here (see the header)"]
    if not any(_works(mode) for mode in MODES):
        return ["a non-root requester that can upcall (neither setuid nor fsuid; see the header)"]
    return []


def header() -> list[str]:
    """Lines for the pytest header: the probe's answers and the requester kinds in use."""
    caps = capabilities()
    if not isinstance(caps, UpcallCapabilities):
        return [f"upcall probe: {caps}"]
    kept = os.environ.get(KEEP_CAPS_ENV)
    setuid = f"setuid child, uid {caps.uid}" + (f", keeping {kept}" if kept else "")
    real = "ruid, " if _emulate_real_uid() else ""
    lines = [
        f"upcall probe: root requester: {caps.root}",
        f"upcall probe: non-root euid ({setuid}): {caps.non_root}",
        f"upcall probe: euid 0 + fsuid {caps.uid}: {caps.fsuid}; + ruid too: {caps.ruid_fsuid}",
    ]
    modes = requester_modes()
    if forced_mode():
        why = f"forced by {FORCE_ENV}"
    elif not any(_works(mode) for mode in MODES):
        why = "NEITHER can upcall here: every tier with non-root requesters fails (see above)"
    elif modes == ["fsuid"]:
        why = "this host refuses upcalls from a non-root euid: emulated"
    else:
        why = "both can upcall here: the keyring tests run under each"
    shown = {"setuid": "setuid (real uid)", "fsuid": f"fsuid (euid 0 + {real}fsuid)"}
    lines.append(f"requesters: {' and '.join(shown[m] for m in modes)}; {why}")
    return lines


def _become(user: pwd.struct_passwd, mode: Mode) -> None:
    # Whatever func imports later, it reads as the user: wherever the checkout lies.
    reach_checkout()
    if mode == "setuid":
        _setuid(user.pw_uid, user.pw_gid)
    else:
        become_fsuid(user.pw_uid, user.pw_gid, real=_emulate_real_uid())


def _outcome(func: Callable[[], object]) -> tuple[dict[str, object], int]:
    try:
        return {"ok": func()}, 0
    except BaseException as exc:  # every failure goes to the parent
        return {"error": type(exc).__name__, "errno": getattr(exc, "errno", None)}, 1


def _child(
    user: pwd.struct_passwd,
    how: tuple[Mode, Session, bool],
    func: Callable[[], object],
    *,
    out: int,
    hold: int | None,
) -> None:
    """In the forked child: become `user`, run func, report, wait for `hold` to close, exit."""
    mode, session, own_net = how
    code = 1
    try:

        def run() -> object:
            if own_net:
                own_network()
            _become(user, mode)
            if session == "new":
                # A new session keyring drops possession of the parent's keys: only what the
                # key permissions grant this user is left.
                from kmskeys import Keyring

                Keyring.join_session()
            return func()

        result, code = _outcome(run)
        os.write(out, json.dumps(result).encode())
        os.close(out)
        if hold is not None:
            os.read(hold, 1)  # until the parent closes its end
    finally:
        os._exit(code)


def _start(
    user: User,
    func: Callable[[], object],
    session: Session,
    mode: Mode | None,
    *,
    hold: bool,
    own_net: bool = False,
) -> tuple[int, int, int | None]:
    """Fork the child; (pid, result read end, hold write end or None)."""
    who = entry(user)
    chosen = mode or default_mode()
    result_r, result_w = os.pipe()
    hold_r, hold_w = os.pipe() if hold else (None, None)
    pid = os.fork()
    if pid == 0:
        os.close(result_r)
        if hold_w is not None:
            os.close(hold_w)
        _child(who, (chosen, session, own_net), func, out=result_w, hold=hold_r)
    os.close(result_w)
    if hold_r is not None:
        os.close(hold_r)
    return pid, result_r, hold_w


def _result(read_end: int) -> object:
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    return json.loads(data) if data else {"error": "ChildDied", "errno": None}


def as_user(
    user: User,
    func: Callable[[], object],
    *,
    session: Session = "new",
    mode: Mode | None = None,
    own_network: bool = False,
) -> object:
    """Run func() in a child as `user`; {"ok": result} or {"error": class name, "errno": n}.

    session="new" joins a fresh session keyring first; "inherit" keeps the parent's, as
    su/runuser do. mode picks the requester kind (default: `default_mode()`). own_network=True
    moves the child to a new network namespace first (nothing routed): for code that probes
    IMDS, such as doctor.
    """
    pid, read_end, _ = _start(user, func, session, mode, hold=False, own_net=own_network)
    try:
        return _result(read_end)
    finally:
        os.waitpid(pid, 0)


class Resident:
    """A child running as `user` that stays alive, holding its keys, until the block ends.

    `setup` runs in the child; its outcome ({"ok": ...} or {"error": ...}) is `self.result`.
    """

    def __init__(
        self,
        user: User,
        setup: Callable[[], object],
        *,
        session: Session = "new",
        mode: Mode | None = None,
    ) -> None:
        self.user = entry(user)
        self.setup = setup
        self.session: Session = session
        self.mode = mode
        self.result: object = None
        self.pid = -1
        self._hold = -1

    def __enter__(self) -> Resident:
        self.pid, read_end, hold = _start(self.user, self.setup, self.session, self.mode, hold=True)
        assert hold is not None
        self._hold = hold
        self.result = _result(read_end)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._hold)
        os.waitpid(self.pid, 0)


class Steps:
    """A child running as `user` that runs `steps[i]` each time `run(i)` asks, keeping its
    session keyring (and the keys cached in it) from one step to the next until the block ends.
    """

    def __init__(
        self,
        user: User,
        steps: Sequence[Callable[[], object]],
        *,
        session: Session = "new",
        mode: Mode | None = None,
    ) -> None:
        self.user = entry(user)
        self.steps = list(steps)
        self.session: Session = session
        self.mode = mode
        self.pid = -1
        self._go = -1
        self._answers: BinaryIO | None = None

    def __enter__(self) -> Steps:
        go_r, go_w = os.pipe()
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.close(out_r)
            self._serve(go_r, out_w)
        os.close(go_r)
        os.close(out_w)
        self.pid, self._go, self._answers = pid, go_w, os.fdopen(out_r, "rb")
        return self

    def _serve(self, go: int, out: int) -> None:
        code = 1
        try:
            ready, code = _outcome(self._become)
            os.write(out, json.dumps(ready).encode() + b"\n")
            while code == 0 and (index := os.read(go, 1)):
                result, _ = _outcome(self.steps[index[0]])
                os.write(out, json.dumps(result).encode() + b"\n")
        finally:
            os._exit(code)

    def _become(self) -> None:
        _become(self.user, self.mode or default_mode())
        if self.session == "new":
            from kmskeys import Keyring

            Keyring.join_session()

    def ready(self) -> object:
        """The outcome of becoming the user: {"ok": None} or {"error": ...}."""
        assert self._answers is not None
        return json.loads(self._answers.readline() or b'{"error": "ChildDied"}')

    def run(self, index: int) -> object:
        """Run steps[index] in the child: {"ok": result} or {"error": class name, "errno": n}."""
        assert self._answers is not None
        os.write(self._go, bytes([index]))
        return json.loads(self._answers.readline() or b'{"error": "ChildDied"}')

    def __exit__(self, *exc: object) -> None:
        os.close(self._go)
        if self._answers is not None:
            self._answers.close()
        os.waitpid(self.pid, 0)


class Requester:
    """One kind of requester, for tests parametrized over `requester_modes()`."""

    def __init__(self, mode: Mode) -> None:
        self.mode: Mode = mode

    def __repr__(self) -> str:
        return f"Requester({self.mode!r})"

    def run(self, user: User, func: Callable[[], object], *, session: Session = "new") -> object:
        """as_user() with this kind."""
        return as_user(user, func, session=session, mode=self.mode)

    @contextmanager
    def resident(
        self, user: User, setup: Callable[[], object], *, session: Session = "new"
    ) -> Iterator[Resident]:
        """A Resident of this kind."""
        with Resident(user, setup, session=session, mode=self.mode) as held:
            yield held


__all__ = [
    "NOBODY",
    "Requester",
    "Resident",
    "Steps",
    "UpcallOutcome",
    "as_user",
    "capabilities",
    "default_mode",
    "header",
    "requester_modes",
]
