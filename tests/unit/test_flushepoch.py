"""The flush epoch's tokens (kmskeys/flushepoch.py): what each flush changes, and what it
leaves alone. The real upcall: tests/upcall/test_flush_epoch.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmskeys import fileio, flushepoch

pytestmark = pytest.mark.unit


def test_a_flush_changes_the_tokens_it_reaches_and_no_other(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # Never flushed (no state_dir yet): the zero token, and nothing is created by reading.
    assert flushepoch.current(state, "kms", "db") == bytes(8)
    assert not state.exists()
    marks = {
        (prefix, name): flushepoch.mark(state, prefix, name)
        for prefix in ("kms", "sm")
        for name in ("db", "web")
    }
    flushepoch.bump(state, "kms", "db")
    changed = {key for key, mark in marks.items() if mark.changed()}
    assert changed == {("kms", "db")}
    assert oct(os.stat(state / flushepoch.FLUSH_DIR).st_mode & 0o777) == "0o700"
    # A selector's token is its name's: a flush of `sm:prod` reaches `sm:prod#password`.
    selector = flushepoch.mark(state, "sm", "prod#password")
    flushepoch.bump(state, "sm", "prod")
    assert selector.changed()
    # --all --prefix P: every name of P; --everything: every name of every prefix.
    marks = {key: flushepoch.mark(state, *key) for key in marks}
    flushepoch.bump(state, "sm", None)
    assert {key for key, mark in marks.items() if mark.changed()} == {("sm", "db"), ("sm", "web")}
    marks = {key: flushepoch.mark(state, *key) for key in marks}
    flushepoch.bump(state, None, None)
    assert all(mark.changed() for mark in marks.values())


def test_a_token_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    flushepoch.bump(state, "kms", "db")
    os.chmod(state / flushepoch.FLUSH_DIR, 0o777)
    with pytest.raises(fileio.UntrustedFileError):
        flushepoch.current(state, "kms", "db")
