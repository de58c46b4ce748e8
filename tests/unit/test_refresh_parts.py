"""The pieces of issue 26.13/26.14 and 20.8 that need no kernel: subuid charging, the refresh
schedule, the records and background results as bytes, root's quota line, the settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from resolver import limits
from resolver.background import Finished
from resolver.config import Config, parse
from resolver.errors import (
    ConfigError,
    RefusedError,
    ServiceUnavailableError,
    UnavailableError,
    UnknownSecretError,
)
from resolver.hostcache import root_quota, root_quota_problem
from resolver.keyrecords import Record
from resolver.refresh import due_after

pytestmark = pytest.mark.unit


@pytest.fixture
def subuid(tmp_path: Path) -> Iterator[tuple[Path, Config]]:
    """A root-owned subuid file of the test's own, and a config whose state_dir is private."""
    path = tmp_path / "subuid"
    path.write_text("")
    os.chmod(path, 0o644)
    state = tmp_path / "state"
    yield path, parse({"state_dir": str(state)})


def _charged(config: Config, path: Path, text: str, uid: int) -> int:
    path.write_text(text)
    return limits.charged_uid(config, uid, path)


def test_a_uid_in_a_range_is_charged_to_its_owner(subuid: tuple[Path, Config]) -> None:
    path, config = subuid
    text = "nobody:200000:65536\n1234:300000:10\n"
    assert _charged(config, path, text, 200000) == 65534  # a name, through getpwnam
    assert _charged(config, path, text, 265535) == 65534  # the last uid of the range
    assert _charged(config, path, text, 265536) == 265536  # one past it
    assert _charged(config, path, text, 300009) == 1234  # a numeric owner
    assert _charged(config, path, text, 1000) == 1000  # in no range


def test_first_valid_line_wins_and_bad_lines_are_skipped(subuid: tuple[Path, Config]) -> None:
    path, config = subuid
    text = (
        "garbage\n"
        "kmst-no-such-user-x:500000:100\n"  # no passwd entry: skipped, not a match
        "bin:500000:0\n"  # an empty range
        ":500000:100\n"  # no owner
        "root:5e5:100\n"  # not decimal
        "  2000:500000:100  \n"  # whitespace is not trimmed (the gate's C reads it so): skipped
        "3000:500000:100\n"  # this line decides
        "4000:500000:100\n"
    )
    assert _charged(config, path, text, 500050) == 3000


def test_off_when_disabled_missing_or_unsafe(subuid: tuple[Path, Config]) -> None:
    path, config = subuid
    text = "nobody:200000:10\n"
    off = Config(**{**config.__dict__, "aggregate_subuids": False})
    assert _charged(off, path, text, 200001) == 200001
    assert limits.charged_uid(config, 200001, path.parent / "absent") == 200001
    assert limits.subuid_owner(200001, str(path.parent / "absent")) == (None, None)
    os.chmod(path, 0o666)  # world-writable: anyone could charge anyone
    assert _charged(config, path, text, 200001) == 200001
    # Why, for the gate's WARNING line (resolver/gate.c logs it, at most once a minute).
    owner, problem = limits.subuid_owner(200001, str(path))
    assert owner is None and problem is not None and "writable by group or others" in problem


def test_the_parse_is_cached_until_the_file_changes(subuid: tuple[Path, Config]) -> None:
    path, config = subuid
    assert _charged(config, path, "nobody:200000:10\n", 200001) == 65534
    assert _charged(config, path, "1:200000:10\n", 200001) == 1


def test_due_after_keeps_the_lead_and_spreads() -> None:
    long = [due_after(0.0, 300, 8.0) for _ in range(500)]
    assert min(long) >= 209 and max(long) <= 239.2 and max(long) - min(long) > 20
    short = [due_after(0.0, 4, 8.0) for _ in range(500)]
    # A 4 s key lives at least 3 s: renewed in its first half, before then.
    assert min(short) >= 0.75 and max(short) <= 1.5


def test_records_and_background_results_round_trip() -> None:
    record = Record(
        42,
        uid=65534,
        gid=65534,
        description="kms:app/db\n#hostile",
        callout=b"kmsk2:AAAA",
        timeout=300,
        answered=12.5,
    )
    back = Record.decode(42, 7, record.encode())
    assert back is not None and back.charged == 7
    assert (back.description, back.callout, back.timeout, back.answered) == (
        "kms:app/db\n#hostile",
        b"kmsk2:AAAA",
        300,
        12.5,
    )
    assert Record.decode(42, 7, record.encode()[:-1]) is None
    for error in (
        RefusedError("KMS AccessDeniedException"),
        ServiceUnavailableError("KMS timed out"),
        UnavailableError("uid 1 is over its KMS call rate"),
        UnknownSecretError("no blob"),
        ConfigError("bad"),
    ):
        done = Finished.decode(Finished(error=error, phases={"decrypt": 1.5}).encode())
        assert type(done.error) is type(error) and done.error is not None
        assert done.error.reason == error.reason and done.phases == {"decrypt": 1.5}
    done = Finished.decode(Finished(b"secret\0bytes", note="not kept: x").encode())
    assert (done.payload, done.error, done.note) == (b"secret\0bytes", None, "not kept: x")


def test_root_quota_is_read_from_key_users(tmp_path: Path) -> None:
    users = tmp_path / "key-users"
    users.write_text(
        "    0:    30 29/29 22/1000000 16614/25000000\n 1000:     2 2/2 2/200 22/20000\n"
    )
    assert root_quota(users) == (22, 1000000, 16614, 25000000)
    users.write_text(" 1000:     2 2/2 2/200 22/20000\n")
    assert root_quota(users) is None
    assert root_quota(tmp_path / "absent") is None
    live = root_quota()
    assert live is not None and live[0] >= 1  # this host's own
    assert root_quota_problem(1.0, 100, True) is None
    problem = root_quota_problem(0.0, 100, True)
    assert problem is not None and "host_cache_root_share 0" in problem


def test_new_settings_defaults_and_refusals() -> None:
    config = Config()
    assert (config.stale_wait, config.host_cache_root_share, config.aggregate_subuids) == (
        1.0,
        0.5,
        True,
    )
    assert (config.host_cache_keys_per_uid, config.host_cache_bytes_per_uid) == (200, 1 << 20)
    assert (config.refresh_ahead, config.refresh_keys_per_uid) == (True, 200)
    assert parse({"stale_wait": 0, "host_cache_root_share": 1}).stale_wait == 0.0
    for bad in (
        {"stale_wait": -0.1},
        {"stale_wait": 61},
        {"stale_wait": "1s"},
        {"host_cache_keys_per_uid": 0},
        {"host_cache_bytes_per_uid": 1.5},
        {"host_cache_root_share": 1.1},
        {"aggregate_subuids": 1},
        {"refresh_ahead": "yes"},
        {"refresh_keys_per_uid": 0},
    ):
        with pytest.raises(ConfigError):
            parse(bad)


def test_the_refresh_unit_is_a_long_running_loop_without_core_dumps() -> None:
    unit = Path(__file__).resolve().parents[2] / "resolver" / "data" / "kmskeys-refresh.service"
    text = unit.read_text()
    for line in ("Type=simple", "LimitCORE=0", "Restart=always", "WantedBy=multi-user.target"):
        assert f"\n{line}\n" in text, line
    assert "\nExecStart=kmskeys-resolver refresh --config /etc/kmskeys/resolver.toml\n" in text
    assert "\nReadWritePaths=/run/kmskeys\n" in text  # its records, locks and buckets


def test_what_is_remembered_for_refresh_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmskeys.contract import ADMIN_KEY_PERM, PROGRAM_ADMIN_KEY_PERM, RESOLVED_KEY_PERM
    from resolver import keyrecords
    from resolver.outcome import Outcome
    from resolver.pipeline import KernelRequest

    config = parse({"state_dir": str(tmp_path / "state"), "refresh_keys_per_uid": 2})

    def answered(serial: int, desc: str, perm: int = ADMIN_KEY_PERM) -> str | None:
        asked = KernelRequest(serial, desc, 1000, 1000, callout=b"kmsk2:AAAA")
        outcome = Outcome(
            "ok", 6, key=serial, uid=1000, timeout=300, negative_ttl=10, payload=b"x", perm=perm
        )
        return keyrecords.remember(config, asked, outcome, 1.0)

    assert answered(11, "kms:app") is None
    assert answered(12, "pass:web/db") == "pass: entries are not renewed"
    assert answered(13, "kms:other", RESOLVED_KEY_PERM) is not None  # no admin group bits
    # A program-bound key: each resolution identifies its requester, which a renewal has not.
    bound = answered(16, "kms:db", PROGRAM_ADMIN_KEY_PERM)
    assert bound == "program-bound keys are not renewed"
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    assert answered(14, "stored:k#user#latest") is None
    # Not fsync'd: records of keys that a reboot takes away (a miss's ~9 ms on a disk).
    assert synced == []
    monkeypatch.undo()
    assert answered(15, "kms:third") == "uid 1000 has refresh_keys_per_uid 2 keys"
    assert {uid: sorted(serials) for uid, serials in keyrecords.listing(config).items()} == {
        1000: [11, 14]
    }
    record = keyrecords.load(config, 1000, 11)
    assert record is not None and record.callout == b"kmsk2:AAAA" and record.timeout == 300
    folder = tmp_path / "state" / "refresh" / "1000"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    keyrecords.forget(config, 1000, 11)
    assert keyrecords.load(config, 1000, 11) is None
