"""resolver.passstore through the real gpg, gpg-agent and `pass`, as a real test user.

Each failure class of docs/dpapi.md ("pass: and hardware tokens") is produced for real: a
locked agent, no agent, a missing entry, links, files of another uid, an entry too large for a
key, a hung agent (the deadline), no gpg. No message or exception carries a byte of an entry.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmskeys.contract import USER_PAYLOAD_MAX
from kmskeys.passname import PassQuery
from resolver import gpgdecrypt, passstore
from resolver.errors import RefusedError, UnavailableError
from tests.support.passgpg import ENTRY, PassOwner

pytestmark = pytest.mark.tokens

FIRST, ALL = PassQuery(), PassQuery(PassQuery.ALL)
SECRETS = (b"hunter2", b"alice", b"example.invalid", b"linked", b"not yours", b"xxxxxxxx")


def _deadline(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def _failure(owner: PassOwner, name: str, query: PassQuery = FIRST, **kw: object) -> Exception:
    location = kw.pop("location", None) or passstore.locate(owner.uid)
    with pytest.raises(Exception) as caught:
        passstore.resolve(location, name, query, _deadline(), **kw)  # type: ignore[arg-type]
    exc = caught.value
    _assert_silent(exc, owner)
    return exc


def _assert_silent(exc: BaseException, owner: PassOwner) -> None:
    """No entry byte and no passphrase in the message, the repr or a chained exception."""
    shown = f"{exc}\n{exc!r}".encode()
    for secret in (*SECRETS, owner.passphrase.encode()):
        assert secret not in shown, (secret, shown)
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def _gpg_processes(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and entry.stat().st_uid == uid
                and (entry / "comm").read_text().strip() == "gpg"
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_reads_the_first_line_the_whole_entry_and_a_field_as_the_user(passer: PassOwner) -> None:
    location = passstore.locate(passer.uid)
    assert location.store_dir == str(passer.store) and location.gnupg_home == str(passer.gnupg)
    # The default home: gpg finds the agent as in the user's session, no GNUPGHOME needed.
    assert "GNUPGHOME" not in location.environment()
    assert passstore.resolve(location, "email/work", FIRST, _deadline()) == b"hunter2"
    whole = ENTRY + f"owner: {passer.pw.pw_name}\n".encode()
    assert passstore.resolve(location, "email/work", ALL, _deadline()) == whole
    login = PassQuery(PassQuery.FIELD, "login")
    assert passstore.resolve(location, "email/work", login, _deadline()) == b"alice"
    url = PassQuery(PassQuery.FIELD, "url")
    assert passstore.resolve(location, "email/work", url, _deadline()).endswith(b"/login")


def test_gpg_runs_as_the_user_with_a_clean_environment(passer: PassOwner) -> None:
    """`env` stands in for gpg (same spawn): its ids and environment are the user's alone."""
    location = passstore.locate(passer.uid)
    read_end, write_end = os.pipe()
    probe = ["/usr/bin/sh", "-c", "id -u; id -g; id -G; env | sort; ps -o pgid= -p $$"]
    proc = gpgdecrypt._spawn(location, probe, subprocess.DEVNULL, write_end, ())
    os.close(write_end)
    proc.wait(30)
    lines = os.read(read_end, 65536).decode().split("\n")
    os.close(read_end)
    assert (lines[0], lines[1]) == (str(passer.uid), str(passer.pw.pw_gid))
    assert lines[2].split() == [str(passer.pw.pw_gid)]  # its own groups, none of root's
    env = dict(line.split("=", 1) for line in lines[3:-2] if "=" in line)
    assert env["HOME"] == str(passer.base) and env["USER"] == passer.pw.pw_name
    assert not {"GPG_TTY", "DISPLAY", "PINENTRY_USER_DATA", "GPG_AGENT_INFO"} & set(env)
    assert int(lines[-2]) == proc.pid  # a process group of its own


def test_a_locked_agent_is_its_own_class_and_does_not_hang(passer: PassOwner) -> None:
    passer.lock()
    exc = _failure(passer, "email/work")
    assert type(exc) is passstore.AgentLockedError
    assert exc.answer_errno == errno.EAGAIN and exc.outcome == "locked" and not exc.alarm
    assert "unlock" in str(exc) and "pass show email/work" in str(exc)
    # Unlocking is all it takes: nothing was cached or broken by the failure.
    passer.unlock()
    location = passstore.locate(passer.uid)
    assert passstore.resolve(location, "email/work", FIRST, _deadline()) == b"hunter2"


def test_no_agent_is_told_apart_and_none_is_started(passer: PassOwner) -> None:
    passer.stop_agent()
    assert not passer.agent_running()
    exc = _failure(passer, "email/work")
    assert type(exc) is passstore.AgentNotRunningError
    assert isinstance(exc, passstore.AgentLockedError) and exc.answer_errno == errno.EAGAIN
    # --no-autostart: root never starts an agent in the user's name.
    assert not passer.agent_running()


def test_missing_entries_and_stores_are_unknown(passer: PassOwner, pass_base: Path) -> None:
    for name in ("email/nothere", "nothere", "nodir/entry", "email/work/deeper"):
        exc = _failure(passer, name)
        assert type(exc) is passstore.PassEntryMissing and exc.answer_errno == errno.ENOKEY
    elsewhere = passstore.locate(passer.uid, store_template=str(pass_base / "no-store"))
    exc = _failure(passer, "email/work", location=elsewhere)
    assert type(exc) is passstore.PassEntryMissing


def test_pass_follows_links_kmskeys_refuses_them(passer: PassOwner) -> None:
    # What pass itself does: it shows an entry through a link out of the store.
    assert passer.run("pass", "show", "email/real").stdout == b"linked\n"
    assert passer.run("pass", "show", "linkdir/real").stdout == b"linked\n"
    for name in ("email/real", "linkdir/real"):
        exc = _failure(passer, name)
        assert type(exc) is passstore.PassRefusedError
        assert exc.answer_errno == errno.EKEYREJECTED and "symbolic link" in str(exc)


def test_files_of_another_uid_are_refused(passer: PassOwner, pass_root: PassOwner) -> None:
    exc = _failure(passer, "foreign")
    assert type(exc) is passstore.PassRefusedError and "owned by uid 65534" in str(exc)
    # Unreadable by the user: opened with the user's file access, it fails as it would for them.
    foreign = passer.store / "foreign.gpg"
    foreign.chmod(0o600)
    try:
        assert "Permission denied" in str(_failure(passer, "foreign"))
    finally:
        foreign.chmod(0o644)
    # Root's store (0700, root's): the user cannot even open it, and nothing reads it as root.
    roots = passstore.locate(passer.uid, store_template=str(pass_root.store))
    exc = _failure(passer, "email/work", location=roots)
    assert isinstance(exc, RefusedError) and "Permission denied" in str(exc)
    # A readable store of another uid is still not the user's.
    pass_root.base.chmod(0o711)
    pass_root.store.chmod(0o755)
    try:
        exc = _failure(passer, "email/work", location=roots)
        assert "owned by uid 0" in str(exc)
    finally:
        pass_root.store.chmod(0o700)
        pass_root.base.chmod(0o700)
    # Nor a GnuPG home of another uid.
    other_home = passstore.locate(passer.uid, gnupg_template=str(pass_root.base))
    pass_root.base.chmod(0o755)
    try:
        exc = _failure(passer, "email/work", location=other_home)
        assert "GnuPG home" in str(exc) and "owned by uid 0" in str(exc)
    finally:
        pass_root.base.chmod(0o700)


def test_hidden_components_and_special_files_are_refused(passer: PassOwner) -> None:
    exc = _failure(passer, "email/.hidden")
    assert "hidden" in str(exc)
    fifo = passer.store / "pipe.gpg"
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, passer.uid, passer.pw.pw_gid)
    try:
        exc = _failure(passer, "pipe")  # a FIFO must neither hang nor be read
        assert "not a regular file" in str(exc)
    finally:
        fifo.unlink()


def test_an_entry_larger_than_a_key_is_refused_saying_so(passer: PassOwner) -> None:
    exc = _failure(passer, "big", ALL)
    assert type(exc) is passstore.PassRefusedError
    assert f"larger than {USER_PAYLOAD_MAX} bytes" in str(exc)
    # Whatever the selector: gpg authenticates the entry only at its end, so a first line is
    # never served from an entry that was not read (and checked) whole.
    exc = _failure(passer, "big", FIRST)
    assert "larger than" in str(exc)
    assert not _gpg_processes(passer.uid)


def test_empty_parts_and_missing_fields_are_refused(passer: PassOwner) -> None:
    exc = _failure(passer, "empty-first")
    assert "empty" in str(exc)
    location = passstore.locate(passer.uid)
    login = PassQuery(PassQuery.FIELD, "login")
    assert passstore.resolve(location, "empty-first", login, _deadline()) == b"bob"
    exc = _failure(passer, "email/work", PassQuery(PassQuery.FIELD, "password"))
    assert "no 'password' field" in str(exc)


@pytest.fixture
def hung_agent(passer: PassOwner) -> Iterator[PassOwner]:
    """The user's agent replaced by a socket that accepts and never answers."""
    passer.stop_agent()
    path = passer.gnupg / "S.gpg-agent"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        os.chown(path, passer.uid, passer.pw.pw_gid)
        listener.listen(16)
        try:
            yield passer
        finally:
            path.unlink(missing_ok=True)


def test_a_hung_agent_meets_the_deadline_and_the_process_group_dies(hung_agent: Path) -> None:
    owner = hung_agent
    assert isinstance(owner, PassOwner)
    location = passstore.locate(owner.uid)
    started = time.monotonic()
    with pytest.raises(UnavailableError) as caught:
        passstore.resolve(location, "email/work", FIRST, time.monotonic() + 2.0)
    assert type(caught.value) is UnavailableError and "deadline" in str(caught.value)
    # Killed at the deadline, not left behind: generous bounds, only to show it did not hang.
    assert time.monotonic() - started < 20
    assert not _gpg_processes(owner.uid)


def test_gpg_missing_is_unavailable(passer: PassOwner) -> None:
    exc = _failure(passer, "email/work", gpg="/nonexistent/gpg")
    assert type(exc) is passstore.GpgMissingError and exc.answer_errno == errno.EAGAIN


def test_root_reads_its_own_store_by_a_configured_location(pass_root: PassOwner) -> None:
    pass_root.unlock()
    location = passstore.locate(
        0, store_template=str(pass_root.store), gnupg_template=str(pass_root.gnupg)
    )
    # Not the default home: gpg is told GNUPGHOME, so it finds this agent and no other.
    assert location.environment()["GNUPGHOME"] == str(pass_root.gnupg)
    assert passstore.resolve(location, "email/work", FIRST, _deadline()) == b"hunter2"
