"""The subuid rules, C and Python alike: which uid a request's limits are charged to.

The gate (resolver/gate_subuid.c) and the resolver (resolver/limits.py charged_uid) must agree
on every line, or a subordinate uid would take one owner's slots and another's bucket. The C
side is built here with a header naming test files in place of /etc/subuid and /etc/passwd, and
both are asked the same questions.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from resolver.limits import subuid_owner

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include "gate.h"
int main(int argc, char **argv)
{
    char problem[512];
    for (int i = 1; i < argc; i++) {
        long uid = strtol(argv[i], NULL, 10);
        long charged = charged_uid(uid, problem, sizeof problem);
        printf("%ld %s\n", charged, problem[0] ? "unsafe" : "-");
    }
    return 0;
}
"""
USERS = "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nbad:line\n"
USERS += "bob:x:1001:1001::/home/bob:/bin/sh\nalice:x:2000:2000::/:/bin/sh\n"
SUBUIDS = "\n".join(
    [
        "alice:100000:65536",  # a name
        "1001:200000:10",  # a numeric owner
        "bob:200005:100",  # overlaps the one above: the first line wins
        "ghost:300000:10",  # an owner nobody has: skipped
        "bob:300000:10",  # ... so this one answers
        "bob:+400000:10",  # a sign: not a number
        "bob:400000:0",  # an empty range
        "bob:500000:10:extra",  # a fourth field
        " bob:600000:10",  # a name with a space: no such user
        "bob:4294967290:10",  # past the end of the uid space: still a range
        "",
        "bob:700000:10",
    ]
)
ASKED = [0, 99999, 100000, 165535, 165536, 200000, 200009, 200010, 300005, 400005, 500005,
         600005, 700000, 700010, 4294967294]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """(subuid file, passwd file, the gate's subuid code built to read them)."""
    build = tmp_path_factory.mktemp("subuid")
    subuid, users = build / "subuid", build / "passwd"
    header = (REPO / "kmskeys" / "contract.h").read_text()
    header = re.sub(r'KMSKEYS_SUBUID_FILE "[^"]*"', f'KMSKEYS_SUBUID_FILE "{subuid}"', header)
    header = re.sub(r'KMSKEYS_USERS_FILE "[^"]*"', f'KMSKEYS_USERS_FILE "{users}"', header)
    (build / "contract.h").write_text(header)
    (build / "driver.c").write_text(DRIVER)
    program = build / "subuid-driver"
    subprocess.run(
        ["cc", "-O2", "-Wall", "-I", str(build), "-I", str(REPO / "resolver"), "-I",
         str(REPO / "kmskeys"), "-o", str(program), str(build / "driver.c"),
         str(REPO / "resolver" / "gate_subuid.c")],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    yield subuid, users, program


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    os.chmod(path, mode)


def _c(program: Path, uids: list[int]) -> list[tuple[int, bool]]:
    out = subprocess.run(
        [str(program), *map(str, uids)], check=True, capture_output=True, text=True, timeout=30
    ).stdout.split("\n")
    return [(int(line.split()[0]), line.split()[1] == "unsafe") for line in out if line]


def _python(subuid: Path, users: Path, uids: list[int]) -> list[tuple[int, bool]]:
    answers = []
    for uid in uids:
        owner, problem = subuid_owner(uid, str(subuid), str(users))
        answers.append((uid if owner is None else owner, problem is not None))
    return answers


def test_c_and_python_charge_every_uid_alike(files: tuple[Path, Path, Path]) -> None:
    subuid, users, program = files
    _write(users, USERS)
    _write(subuid, SUBUIDS)
    expected = [
        (0, False),
        (99999, False),
        (1000, False),  # alice: her first passwd entry
        (1000, False),
        (165536, False),
        (1001, False),
        (1001, False),
        (1001, False),  # bob's overlapping line
        (1001, False),  # ghost skipped, bob's line
        (400005, False),
        (500005, False),
        (600005, False),
        (1001, False),
        (700010, False),
        (1001, False),
    ]
    assert _python(subuid, users, ASKED) == expected
    assert _c(program, ASKED) == expected


OFF = [(100000, True), (200000, True), (700000, True)]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s, u: os.chmod(s, 0o664), OFF),
        (lambda s, u: os.chmod(s, 0o646), OFF),
        (lambda s, u: os.chown(s, 1000, 0), OFF),
        # Only a name needs the passwd file: a numeric owner still answers.
        (lambda s, u: os.chmod(u, 0o666), [(100000, True), (1001, False), (700000, True)]),
    ],
    ids=["subuid-group-writable", "subuid-world-writable", "subuid-not-roots", "passwd-unsafe"],
)
def test_an_unsafe_file_turns_aggregation_off(
    files: tuple[Path, Path, Path], change: object, expected: list[tuple[int, bool]]
) -> None:
    subuid, users, program = files
    _write(users, USERS)
    _write(subuid, SUBUIDS)
    os.chown(subuid, 0, 0)
    change(subuid, users)  # type: ignore[operator]
    asked = [uid for uid, _ in OFF]
    assert _python(subuid, users, asked) == expected
    assert _c(program, asked) == expected


def test_no_subuid_file_means_no_ranges(files: tuple[Path, Path, Path]) -> None:
    subuid, users, program = files
    _write(users, USERS)
    subuid.unlink(missing_ok=True)
    assert _python(subuid, users, [100000]) == [(100000, False)]
    assert _c(program, [100000]) == [(100000, False)]


def test_a_nul_byte_ends_the_file_for_both(files: tuple[Path, Path, Path]) -> None:
    subuid, users, program = files
    _write(users, USERS)
    subuid.write_bytes(b"alice:100000:10\nbob:200000\x00:10\nbob:300000:10\n")
    os.chmod(subuid, 0o644)
    asked = [100005, 200005, 300005]
    assert _python(subuid, users, asked) == [(1000, False), (200005, False), (300005, False)]
    assert _c(program, asked) == _python(subuid, users, asked)
