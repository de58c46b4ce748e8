"""kmskeys-gate: the small C program request-key runs first takes the requester's slot, or
answers EAGAIN without starting Python (resolver/gate.c).

To show which program answered, the tests change the config after install: the gate keeps the
slot count the rule was installed with, the handler reads the config.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kmskeys import Keyring, TemporarilyUnavailableError, get_secret
from kmskeys.contract import rule_file_name
from tests.support.names import unique
from tests.support.prereqs import REQUEST_KEY_D
from tests.upcall.harness import Install, run_resolver

pytestmark = pytest.mark.upcall


@contextmanager
def _holding_slots(install: Install, uid: int, indices: range) -> Iterator[None]:
    """Hold `uid`'s slot files `indices` in `install`'s state_dir, as busy handlers would."""
    state = Path(install.settings["state_dir"])
    state.mkdir(mode=0o700, exist_ok=True)
    fds = []
    try:
        for index in indices:
            fd = os.open(state / f"slot-{uid}-{index}", os.O_RDWR | os.O_CREAT, 0o600)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _set_slots(install: Install, slots: int) -> None:
    """Change max_concurrent_per_uid in the config without re-running install."""
    text = install.config.read_text()
    text = re.sub(r"(?m)^max_concurrent_per_uid = \d+$", f"max_concurrent_per_uid = {slots}", text)
    install.config.write_text(text)


@pytest.fixture(params=[False, True], ids=["handler", "daemon"])
def gated(extra_install: Callable[..., Any], request: pytest.FixtureRequest) -> Iterator[Install]:
    """An install whose rule's gate allows 2 slots per uid; its misses go to the handler, or to
    the resolver daemon through the gate."""
    with extra_install(max_concurrent_per_uid=2, daemon=request.param) as install:
        assert install.proxy is not None
        install.proxy.reset_counts()
        yield install


def _rule_program(install: Install) -> list[str]:
    """The program line of `install`'s request-key rule, split as request-key splits it."""
    text = (REQUEST_KEY_D / rule_file_name(install.prefix)).read_text()
    (rule,) = (line for line in text.splitlines() if line.startswith("create "))
    return rule.split()[4:]


def test_rule_runs_the_gate_first(gated: Install) -> None:
    program = _rule_program(gated)
    assert Path(program[0]).name == "kmskeys-gate"
    daemon = gated.settings.get("warm_socket")
    assert program[1:15] == [
        str(gated.settings["state_dir"]),
        "2",
        str(gated.settings["negative_ttl"]),
        str(gated.settings["syslog_socket"]),
        "10",  # authpriv
        str(daemon) if daemon else "-",  # the resolver daemon's socket
        "500",  # daemon_wait, in ms
        "1",  # aggregate_subuids
        "%k",
        "%u",
        "%T",  # the requester's keyrings, for the daemon's identification
        "%P",
        "%S",
        "--",
    ]
    assert Path(program[15]).name == "kmskeys-resolver" and program[16] == "handle"


def test_a_free_slot_is_handed_to_the_handler(gated: Install) -> None:
    # Slot 0 is busy; the gate takes slot 1 and the handler resolves holding it.
    name = unique("gate-free")
    blob = gated.blob(b"kmst-gate-value", name)
    with _holding_slots(gated, os.getuid(), range(1)):
        assert get_secret(name, blob, prefix=gated.prefix) == b"kmst-gate-value"
    line = gated.log.wait_for(name)
    assert "outcome=ok" in line, line


def test_busy_uid_is_answered_by_the_gate_alone(gated: Install) -> None:
    # The config now allows 8 slots, the rule's gate still 2: the handler would find a free
    # slot and resolve, so an EAGAIN here can only come from the gate.
    _set_slots(gated, 8)
    name = unique("gate-busy")
    blob = gated.blob(b"kmst-gate-value", name)
    busy = _holding_slots(gated, os.getuid(), range(2))
    with busy, pytest.raises(TemporarilyUnavailableError) as raised:
        get_secret(name, blob, prefix=gated.prefix)
    assert raised.value.errno == errno.EAGAIN
    assert gated.decrypts() == 0
    line = gated.log.wait_for(name)
    # The same line the handler would write, fields in the same order.
    assert re.search(
        rf"kmskeys-resolver\[\d+\]: uid={os.getuid()} name={name} key=\d+ outcome=unavailable "
        r'errno=EAGAIN reason="uid \d+ already has 2 requests being resolved '
        r'\(max_concurrent_per_uid\)"$',
        line,
    ), line
    Keyring.join_session()  # drop the negative key
    assert get_secret(name, blob, prefix=gated.prefix) == b"kmst-gate-value"


def test_a_gate_slot_the_config_no_longer_allows_is_busy(gated: Install) -> None:
    # Lowered to 1 after install: the gate hands over slot 1, which the handler refuses.
    _set_slots(gated, 1)
    name = unique("gate-lowered")
    blob = gated.blob(b"kmst-gate-value", name)
    busy = _holding_slots(gated, os.getuid(), range(1))
    with busy, pytest.raises(TemporarilyUnavailableError):
        get_secret(name, blob, prefix=gated.prefix)
    assert "already has 1 requests" in gated.log.wait_for(name)
    # Re-running install writes the config's count into the rule.
    done = run_resolver("install", "--config", str(gated.config), "--prefix", gated.prefix)
    assert done.returncode == 0, done.stderr
    assert _rule_program(gated)[2] == "1"


def test_a_gate_built_from_other_sources_is_refused_loudly(
    gated: Install, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The same gate, built with a header whose stamp is not this build's: the handler that the
    # rule runs after it, or the daemon it hands the miss to, answers EAGAIN (never cached) and
    # says why at ERR.
    repo = Path(__file__).resolve().parents[2]
    build = tmp_path_factory.mktemp("stale-gate")
    os.chmod(build, 0o755)
    header = (repo / "kmskeys" / "contract.h").read_text()
    stale = re.sub(r'KMSKEYS_BUILD_STAMP "[^"]*"', 'KMSKEYS_BUILD_STAMP "0.0.0+stale"', header)
    (build / "contract.h").write_text(stale)
    gate = build / "kmskeys-gate"
    sources = [
        str(repo / "resolver" / f)
        for f in ("gate.c", "gate_daemon.c", "gate_request.c", "gate_subuid.c")
    ]
    include = ["-I", str(build), "-I", str(repo / "kmskeys")]
    subprocess.run(["cc", "-O2", *include, "-o", str(gate), *sources], check=True)
    rule = REQUEST_KEY_D / rule_file_name(gated.prefix)
    original = rule.read_text()
    program = _rule_program(gated)
    rule.write_text(original.replace(program[0], str(gate)))
    try:
        name = unique("gate-stale")
        with pytest.raises(TemporarilyUnavailableError):
            get_secret(name, gated.blob(b"kmst-gate-value", name), prefix=gated.prefix)
        line = gated.log.wait_for(name)
        assert line.startswith("<83>") and "outcome=unavailable errno=EAGAIN" in line, line
        assert "kmskeys-gate was built from other sources (stamp 0.0.0+stale" in line, line
        assert gated.decrypts() == 0
    finally:
        rule.write_text(original)


def test_a_rule_written_before_the_daemon_still_works(gated: Install) -> None:
    # `FACILITY %k %u --`: no daemon socket, no aggregation, no keyrings; the handler answers.
    rule = REQUEST_KEY_D / rule_file_name(gated.prefix)
    original = rule.read_text()
    program = _rule_program(gated)
    older = " ".join([*program[:6], "%k", "%u", "--", *program[15:]])
    rule.write_text(original.replace(" ".join(program), older))
    try:
        name = unique("gate-older")
        assert get_secret(name, gated.blob(b"kmst-older", name), prefix=gated.prefix) == (
            b"kmst-older"
        )
        line = gated.log.wait_for(name)
        assert "outcome=ok" in line and "import" in line, line  # the handler's own line
    finally:
        rule.write_text(original)
