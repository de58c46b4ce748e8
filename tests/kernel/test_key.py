"""Key and Keyring against the real kernel keyring, each test in a fresh session keyring."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

import kmskeys
from kmskeys import Key, Keyring, lowlevel
from kmskeys.errors import (
    InvalidArgumentError,
    KeyExpiredError,
    KeyNotFoundError,
    KeyOwnershipError,
    KeyPermissionError,
    KeyRejectedError,
    KeyRevokedError,
    KeyTypeUnavailableError,
    KmsKeysError,
    OperationNotPermittedError,
    PayloadTooLargeError,
    QuotaExceededError,
)
from tests.support.names import unique
from tests.support.request_key_rule import request_key_rule
from tests.support.requester import NOBODY, as_user
from tests.support.ttl import MIN_TTL, gone_after, shortest_life

pytestmark = pytest.mark.kernel


def desc() -> str:
    return f"kms:{unique()}"


def test_round_trip_add_request_read_describe(session_keyring: Keyring) -> None:
    name = desc()
    added = Key.add("user", name, b"s3cret-payload", session_keyring)
    found = Key.request(name)
    assert found == added
    assert found.read() == b"s3cret-payload"
    info = found.describe()
    assert (info.type, info.uid, info.gid, info.description) == ("user", 0, 0, name)
    assert info.perm & 0x3F000000 == 0x3F000000  # possessor has every right
    assert found in session_keyring.list()


@pytest.mark.parametrize(
    ("description", "payload"),
    [("str", "str"), (b"bytes", b"bytes"), ("str", b"bytes"), (b"bytes", "str")],
)
def test_str_and_bytes_inputs(
    session_keyring: Keyring, description: str | bytes, payload: str | bytes
) -> None:
    name = desc()
    d = name if isinstance(description, str) else name.encode()
    p = "päyload ✓" if isinstance(payload, str) else "päyload ✓".encode()
    key = Key.add("user", d, p, session_keyring)
    assert Key.request(d).read() == "päyload ✓".encode()
    assert key.describe().description == name


def test_binary_payload_is_byte_exact(session_keyring: Keyring) -> None:
    payload = bytes(range(256)) * 4 + b"\x00\x00trailing-nul\x00"
    key = session_keyring.add_key("user", desc(), payload)
    assert key.read() == payload


def test_largest_user_payload_round_trips(session_keyring: Keyring) -> None:
    payload = bytes(i % 251 for i in range(32767))
    assert session_keyring.add_key("user", desc(), payload).read() == payload


def test_oversized_payload_is_a_clear_error(session_keyring: Keyring) -> None:
    with pytest.raises(PayloadTooLargeError, match="at most 32767 bytes"):
        session_keyring.add_key("user", desc(), b"x" * 32768)


def test_empty_payload_is_a_clear_error(session_keyring: Keyring) -> None:
    # The kernel's `user` type refuses 0-byte payloads (EINVAL); say so before the syscall.
    with pytest.raises(InvalidArgumentError, match="empty payload"):
        session_keyring.add_key("user", desc(), b"")


def test_timeout_expires_the_key_within_whole_seconds(session_keyring: Keyring) -> None:
    key = session_keyring.add_key("user", desc(), b"short-lived")
    set_at = time.monotonic()
    key.set_timeout(MIN_TTL)
    assert key.read() == b"short-lived"
    while time.monotonic() < set_at + gone_after(MIN_TTL):
        try:
            key.read()
        except KeyExpiredError as exc:
            assert exc.errno == errno.EKEYEXPIRED
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"key did not expire within {gone_after(MIN_TTL)} s of a {MIN_TTL} s timeout")
    # Expiry is counted in whole seconds: a T s timeout ends between T - 1 and T s after it is set.
    assert time.monotonic() - set_at >= shortest_life(MIN_TTL) - 0.05


def test_revoke(session_keyring: Keyring) -> None:
    key = session_keyring.add_key("user", desc(), b"x")
    key.revoke()
    with pytest.raises(KeyRevokedError):
        key.read()


def test_invalidate_removes_key_everywhere(session_keyring: Keyring) -> None:
    name = desc()
    key = session_keyring.add_key("user", name, b"x")
    key.invalidate()
    # The serial is dead to us: unlinked (no longer possessed, EACCES) or freed (ENOKEY),
    # depending on the key GC's timing.
    with pytest.raises((KeyNotFoundError, KeyPermissionError)):
        key.read()
    # Until the GC has run, a search meets the dead key (EKEYREVOKED, and no upcall); after it,
    # the name is simply not found.
    deadline = time.monotonic() + 5
    while True:
        try:
            Key.request(name)
        except KeyNotFoundError:
            break
        except KeyRevokedError:
            assert time.monotonic() < deadline, "key GC did not run within 5 s"
            time.sleep(0.01)
        else:
            pytest.fail("an invalidated key was found again")
    assert session_keyring.list() == []


def test_unlink_and_link(session_keyring: Keyring) -> None:
    key = session_keyring.add_key("user", desc(), b"x")
    other = Keyring(Key.add("keyring", unique("ring"), b"", session_keyring).serial)
    key.link(other)
    assert other.list() == [key]
    key.unlink(other)
    assert other.list() == []
    other.link_key(key)
    assert other.search(key.describe().description) == key
    other.unlink_key(key)
    assert other.list() == []


def test_null_callout_never_upcalls(session_keyring: Keyring) -> None:
    # request_key(2) with a NULL callout only searches: ENOKEY at once, no key is constructed.
    name = desc()
    with pytest.raises(KeyNotFoundError):
        Key.request(name)
    assert name not in Path("/proc/keys").read_text()


def test_special_keyrings_resolve() -> None:
    # In a child: a thread or process keyring created in the pytest process would become
    # request_key's default destination for every later test.
    def resolve() -> dict[str, object]:
        serials = {
            "thread": Keyring.thread().serial,
            "process": Keyring.process().serial,
            "session": Keyring.session().serial,
            "user": Keyring.user().serial,
            "user_session": Keyring.user_session().serial,
        }
        return {"serials": serials, "user_type": Keyring.user().describe().type}

    result = as_user(0, resolve)
    serials = result["ok"]["serials"]  # type: ignore[index]
    assert all(serial > 0 for serial in serials.values()), serials
    assert len(set(serials.values())) == len(serials)
    assert result["ok"]["user_type"] == "keyring"  # type: ignore[index]


def test_join_session_gives_a_new_empty_keyring(session_keyring: Keyring) -> None:
    session_keyring.add_key("user", desc(), b"x")
    fresh = Keyring.join_session()
    assert fresh != session_keyring
    assert Keyring.session() == fresh
    assert fresh.list() == []


def test_other_uid_cannot_read_the_key(session_keyring: Keyring) -> None:
    key = session_keyring.add_key("user", desc(), b"root-only")
    # The safe tier refuses before reading: the key is not the reader's.
    assert as_user(NOBODY, key.read) == {"error": "KeyOwnershipError", "errno": errno.EACCES}
    # The low-level tier reads unchecked, and the kernel's own permission check refuses.
    unchecked = lowlevel.Key(key.serial).read
    assert as_user(NOBODY, unchecked) == {"error": "KeyPermissionError", "errno": errno.EACCES}


OPEN = 0x3F3F3F3F  # every permission for everyone: what a planter sets


def _planted(session_keyring: Keyring) -> tuple[str, int]:
    """A key NOBODY adds to this (shared) session keyring, readable by everyone."""
    name = desc()

    def plant() -> int:
        key = lowlevel.Keyring.session().add_key("user", name, b"planted")
        assert isinstance(key, lowlevel.Key)
        key.setperm(OPEN)
        return key.serial

    result = as_user(NOBODY, plant, session="inherit")
    assert isinstance(result, dict) and "ok" in result, result
    return name, result["ok"]


def test_the_safe_tier_never_returns_a_key_another_uid_planted(session_keyring: Keyring) -> None:
    name, serial = _planted(session_keyring)
    # The card's form and the essay's form (callout info given: found in the keyring, so no
    # upcall happens) both refuse, naming the owner; so does a read by serial.
    for call in (
        lambda: Key.request(name),
        lambda: Key.request(name.encode(), callout_info=b"Q0lDSQ=="),
        lambda: Key(serial).read(),
        lambda: session_keyring.search(name).read(),
    ):
        with pytest.raises(KeyOwnershipError) as caught:
            call()
        assert caught.value.owner == NOBODY and caught.value.serial == serial
    # The kernel itself would have handed it over: only the owner check stands in between.
    assert lowlevel.Key.request(name).read() == b"planted"


def test_a_key_checked_for_one_fsuid_is_checked_again_for_another(
    session_keyring: Keyring,
) -> None:
    name = desc()
    session_keyring.add_key("user", name, b"root-only")
    key = Key.request(name)
    assert key.read() == b"root-only"  # checked and remembered for this thread, for a second

    def read_again() -> bytes:
        # A forked child inherits the thread's memory of the check; as another fsuid, which
        # possesses the key through the inherited session (the kernel would let it read), the
        # check is made again and refuses.
        return key.read()

    assert as_user(NOBODY, read_again, session="inherit", mode="fsuid") == {
        "error": "KeyOwnershipError",
        "errno": errno.EACCES,
    }


def test_the_sharp_calls_are_in_the_low_level_tier_only() -> None:
    sharp = ("instantiate", "reject", "negate", "assume_authority", "setperm", "chown")
    assert not [name for name in sharp if hasattr(Key, name) or hasattr(Keyring, name)]
    assert all(hasattr(lowlevel.Key, name) and hasattr(lowlevel.Keyring, name) for name in sharp)
    assert issubclass(lowlevel.Keyring, Keyring) and issubclass(lowlevel.Key, Key)


def test_other_uid_cannot_find_the_key_by_search(session_keyring: Keyring) -> None:
    name = desc()
    session_keyring.add_key("user", name, b"root-only")
    result = as_user(NOBODY, lambda: Key.request(name).serial)
    assert result == {"error": "KeyNotFoundError", "errno": errno.ENOKEY}


# One test per errno class: each producer makes the kernel answer with that errno.
def _enokey(ring: Keyring) -> None:
    Key.request(desc())


def _ekeyexpired(ring: Keyring) -> None:
    key = ring.add_key("user", desc(), b"x")
    key.set_timeout(MIN_TTL)
    time.sleep(gone_after(MIN_TTL))
    key.read()


def _ekeyrevoked(ring: Keyring) -> None:
    key = ring.add_key("user", desc(), b"x")
    key.revoke()
    key.read()


def _eacces(ring: Keyring) -> None:
    key = lowlevel.Keyring(ring.serial).add_key("user", desc(), b"x")
    assert isinstance(key, lowlevel.Key)
    key.setperm(0)
    key.read()


def _eperm(ring: Keyring) -> None:
    # Key types named with a leading '.' are internal.
    ring.add_key(".request_key_auth", desc(), b"x")


def _edquot(ring: Keyring) -> None:
    def fill() -> None:
        session = Keyring.session()
        for i in range(400):  # far past the default 200 keys / 20000 bytes of a non-root uid
            session.add_key("user", f"kms:{unique()}-{i}", b"q" * 2000)

    result = as_user(NOBODY, fill)
    raise kmskeys.errors.error_for_errno(result["errno"], "add_key")  # type: ignore[index]


def _einval(ring: Keyring) -> None:
    Key.request("user", callout_info="x" * 4096)  # callout info is capped at 4095 bytes


def _enodev(ring: Keyring) -> None:
    ring.add_key("no_such_key_type", desc(), b"x")


@pytest.mark.parametrize(
    ("producer", "cls", "err"),
    [
        (_enokey, KeyNotFoundError, errno.ENOKEY),
        (_ekeyexpired, KeyExpiredError, errno.EKEYEXPIRED),
        (_ekeyrevoked, KeyRevokedError, errno.EKEYREVOKED),
        (_eacces, KeyPermissionError, errno.EACCES),
        (_eperm, OperationNotPermittedError, errno.EPERM),
        (_edquot, QuotaExceededError, errno.EDQUOT),
        (_einval, InvalidArgumentError, errno.EINVAL),
        (_enodev, KeyTypeUnavailableError, errno.ENODEV),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_errno_class(
    session_keyring: Keyring, producer: object, cls: type[KmsKeysError], err: int
) -> None:
    with pytest.raises(cls) as info:
        producer(session_keyring)  # type: ignore[operator]
    assert info.value.errno == err
    assert isinstance(info.value, KmsKeysError)


@pytest.mark.upcall
def test_rejected_by_a_request_key_handler_is_its_own_class(session_keyring: Keyring) -> None:
    with (
        request_key_rule("/bin/keyctl reject %k 5 rejected %S") as prefix,
        pytest.raises(KeyRejectedError) as info,
    ):
        kmskeys.get_secret(unique(), prefix=prefix)
    assert info.value.errno == errno.EKEYREJECTED
    assert "journalctl -t kmskeys-resolver" in str(info.value)


@pytest.mark.upcall
def test_get_secret_without_blob_still_upcalls(session_keyring: Keyring) -> None:
    with request_key_rule("/bin/keyctl instantiate %k upcalled %S") as prefix:
        name = unique()
        with pytest.raises(KeyNotFoundError):
            Key.request(f"{prefix}:{name}")  # NULL callout: no upcall
        assert kmskeys.get_secret(name, prefix=prefix) == b"upcalled"
        # The essay's call form, with the blob as callout info.
        key = Key.request(f"{prefix}:{unique()}".encode(), callout_info=b"Q0lDSQ==")
        assert key.read() == b"upcalled"


@pytest.mark.upcall
@pytest.mark.parametrize(("action", "answered"), [("reject", KeyRejectedError), ("inst", bytes)])
def test_a_key_that_expires_before_the_upcall_exits_is_enokey_to_its_requester(
    session_keyring: Keyring, tmp_path: Path, action: str, answered: type
) -> None:
    # Kernel fact (call_sbin_request_key): when the upcall program exits, a key that no longer
    # validates, e.g. because its timeout has already passed, makes the requester that started
    # the upcall get ENOKEY, whatever the handler answered. Expiry counts whole seconds, so a
    # 1 s timeout can pass milliseconds after it is set: ttl and negative_ttl must be at least
    # MIN_TTL (tests/support/ttl.py), which outlives a prompt exit by a second or more.
    script = tmp_path / "late.sh"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$3" = reject ]; then keyctl reject "$1" "$5" rejected "$2"\n'
        'else keyctl timeout "$1" "$5"; keyctl instantiate "$1" hello "$2"; fi\n'
        'sleep "$4"\n'
    )
    script.chmod(0o755)
    with request_key_rule(f"{script} %k %S {action} 0 {MIN_TTL}") as prefix:
        if answered is bytes:
            assert kmskeys.get_secret(unique(), prefix=prefix) == b"hello"
        else:
            with pytest.raises(answered):
                kmskeys.get_secret(unique(), prefix=prefix)
    # The same answer, but the program exits only once the key's whole timeout has passed.
    with (
        request_key_rule(f"{script} %k %S {action} {gone_after(MIN_TTL)} {MIN_TTL}") as prefix,
        pytest.raises(KeyNotFoundError),
    ):
        kmskeys.get_secret(unique(), prefix=prefix)


def test_key_request_takes_every_argument_form_alike(session_keyring: Keyring) -> None:
    """Key.request is C on its fast path (bytes, no destination) and Python otherwise: both
    answer alike, with the same checks and errors."""
    name = desc()
    key = session_keyring.add_key("user", name, b"same")
    forms = [
        lambda: Key.request(name.encode()),
        lambda: Key.request(name),
        lambda: Key.request(description=name.encode(), type=b"user"),
        lambda: Key.request(name, None, session_keyring, "user"),
        lambda: Key.request(name.encode(), destination=session_keyring.serial),
    ]
    for form in forms:
        found = form()
        assert type(found) is Key and found == key and found.read() == b"same"
    assert type(Keyring.request(name.encode())) is Keyring  # the class it was called on
    for missing in (lambda: Key.request(desc().encode()), lambda: Key.request(desc())):
        with pytest.raises(KeyNotFoundError):
            missing()
    with pytest.raises(TypeError):
        Key.request(name.encode(), nonsense=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Key.request(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Key.request(name.encode() + b"\0x")


@pytest.mark.parametrize("size", [1, 1023, 1024, 1025, 4096, 4097, 32767])
def test_payloads_on_either_side_of_the_first_read_come_back_whole(
    session_keyring: Keyring, size: int
) -> None:
    # kmskeys/_hitpath.c reads 1024 bytes first and reads again when the payload is larger.
    prefix, name = "kmst", unique()
    payload = bytes((i * 7 + size) % 251 for i in range(size))
    session_keyring.add_key("user", f"{prefix}:{name}", payload)
    assert Key.request(f"{prefix}:{name}").read() == payload
    assert kmskeys.get_secret(name, prefix=prefix) == payload
