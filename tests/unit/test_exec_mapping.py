"""`kmskeys exec`'s mapping: what goes where, checked before any secret is asked for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kmskeys.errors import InvalidNameError
from kmskeys.exec_cli import Mapping, UsageError, _read_env_file

pytestmark = pytest.mark.unit


def test_env_and_files_map_to_names_each_resolved_once() -> None:
    mapping = Mapping()
    mapping.add_env("DB_PASSWORD=db-password", "--env")
    mapping.add_env(" _TOKEN = app/token ", "--env")
    mapping.add_file("db=db-password", "--file")
    mapping.add_file("api.token@v2=app/token", "--file")
    assert mapping.env == {"DB_PASSWORD": "db-password", "_TOKEN": "app/token"}
    assert mapping.files == {"db": "db-password", "api.token@v2": "app/token"}
    assert mapping.names() == ["db-password", "app/token"]


@pytest.mark.parametrize("item", ["1A=x", "A-B=x", "A B=x", "=x", "A=", "A", "É=x"])
def test_bad_env_items_are_usage_errors(item: str) -> None:
    with pytest.raises(UsageError, match="--env"):
        Mapping().add_env(item, "--env")


@pytest.mark.parametrize("item", ["../x=n", "a/b=n", ".hidden=n", "..=n", "sp ace=n", "=n"])
def test_file_names_are_one_plain_segment(item: str) -> None:
    with pytest.raises(UsageError, match=r"credential file name|expected"):
        Mapping().add_file(item, "--file")


def test_targets_given_twice_are_refused() -> None:
    mapping = Mapping()
    mapping.add_env("A=x", "--env")
    mapping.add_file("f=x", "--file")
    with pytest.raises(UsageError, match="twice"):
        mapping.add_env("A=y", "--env")
    with pytest.raises(UsageError, match="twice"):
        mapping.add_file("f=y", "--file")


def test_secret_names_are_validated_as_everywhere() -> None:
    with pytest.raises(InvalidNameError):
        Mapping().add_env("A=../etc/passwd", "--env")


def test_env_file_lines_comments_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_text("# a comment\n\nA=one\n  B = two  \n")
    mapping = Mapping()
    _read_env_file(str(good), mapping)
    assert mapping.env == {"A": "one", "B": "two"}
    bad = tmp_path / "bad"
    for line, expected in (
        ("hunter2 secret", "expected TARGET=NAME$"),
        ("DB_PASSWORD=hunter2 !", "not a valid secret name"),
        ("hunter2!=db", "not an environment variable name"),
    ):
        bad.write_text(f"A=one\n{line}\n")
        with pytest.raises(UsageError, match=re.escape(f"{bad}:2: ")) as raised:
            _read_env_file(str(bad), Mapping())
        # A value written into the mapping by mistake is never echoed back.
        assert "hunter2" not in str(raised.value)
        assert raised.match(expected)
    with pytest.raises(UsageError, match="--env-file"):
        _read_env_file(str(tmp_path / "missing"), Mapping())
