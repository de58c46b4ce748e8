"""/proc/key-users as kmskeys.keyusers reads it: one uid's line, found wherever it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmskeys.keyusers import PROC_KEY_USERS, KeyQuota, key_quota

pytestmark = pytest.mark.unit

LINES = (
    "    0:   154 153/153 14/1000000 49474/25000000\n"
    "   42:     1 1/1 1/200 bad/20000\n"
    + "".join(f"{uid:5d}:     3 3/3 3/200 342/20000\n" for uid in range(1000, 6000))
    + "65534:     2 2/2 2/200 99/20000"  # no newline at the end
)


def test_a_uids_line_is_found_wherever_the_file_has_it(tmp_path: Path) -> None:
    path = tmp_path / "key-users"
    path.write_text(LINES)
    assert key_quota(0, path) == KeyQuota(14, 1000000, 49474, 25000000)
    assert key_quota(5999, path) == KeyQuota(3, 200, 342, 20000)  # past the first chunk
    assert key_quota(65534, path) == KeyQuota(2, 200, 99, 20000)
    assert key_quota(42, path) is None  # a line that does not parse
    assert key_quota(7, path) is None  # no keys, no line
    with pytest.raises(OSError):
        key_quota(0, tmp_path / "missing")


def test_roots_line_is_read_from_the_kernels_file() -> None:
    found = key_quota(0, PROC_KEY_USERS)
    assert found is not None and found.keys >= 1 and found.max_keys >= found.keys
