"""Host-cache charges (issue 20.8, second bullet): entries are charged to the requesting uid.

With `allow_legacy_blobs` on, one decrypted legacy blob (bound to no name) can be asked for
under any number of names, each a host-cache entry in root's key quota. Each uid's entries stop
at its charge (count and bytes) and never take root past its configured share; the requester
still gets its answer every time (the cache is an optimisation: answered, just not kept).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

import encryptor
from kmskeys import Key
from tests.support.names import unique
from tests.support.requester import NOBODY, as_user
from tests.upcall.harness import Install
from tests.upcall.refreshing import host_cache_entries, purge_host_cache

pytestmark = pytest.mark.upcall

SECRET = b"kmst-legacy-shared"


def _legacy(install: Install) -> str:
    return str(encryptor.encrypt_raw(SECRET, install.key_arn, client=install.kms()).to_text())


def _flood(install: Install, names: list[str], blob: str) -> object:
    """As nobody: one legacy blob under every name, each in a fresh request."""

    def ask() -> list[str]:
        return [Key.request(install.description(n), blob).read().decode() for n in names]

    assert install.proxy is not None
    install.proxy.reset_counts()
    return as_user(NOBODY, ask)


def _notes(install: Install, names: list[str]) -> list[str | None]:
    """Each name's line's `cache=` note (why the host cache did not keep it), or None."""
    notes = []
    for name in names:
        line = install.log.wait_for(name)
        assert " outcome=ok " in line, line
        found = re.search(r' cache="([^"]*)"', line)
        notes.append(found.group(1) if found else None)
    return notes


def test_one_uids_entries_stop_at_its_charge_and_it_is_answered_still(
    extra_install: Callable[..., Any],
) -> None:
    with extra_install(allow_legacy_blobs=True, host_cache_keys_per_uid=3) as install:
        try:
            names = [unique("charge") for _ in range(5)]
            assert _flood(install, names, _legacy(install)) == {"ok": [SECRET.decode()] * 5}
            notes = _notes(install, names)
            assert notes[:3] == [None] * 3, notes
            for note in notes[3:]:
                assert note is not None and note.startswith(
                    f"not kept: uid {NOBODY} is at its host-cache charge (3 entries,"
                ), note
                assert "host_cache_keys_per_uid 3" in note, note
            assert len(host_cache_entries(install.prefix)) == 3
            # Each name not kept cost its own Decrypt: the attack buys no more cache, only calls
            # on its own budget.
            assert install.decrypts() == 5
            # Another uid is charged on its own: root's entries are not nobody's.
            other = unique("charge")
            blob = _legacy(install)
            assert Key.request(install.description(other), blob).read() == SECRET
            assert _notes(install, [other]) == [None]
            assert len(host_cache_entries(install.prefix)) == 4
        finally:
            purge_host_cache(install.prefix)


def test_a_uids_bytes_are_charged_too(extra_install: Callable[..., Any]) -> None:
    # An entry costs its description (about 120 bytes here) and its payload: two fit in 400.
    with extra_install(allow_legacy_blobs=True, host_cache_bytes_per_uid=400) as install:
        try:
            names = [unique("bytes") for _ in range(3)]
            assert _flood(install, names, _legacy(install)) == {"ok": [SECRET.decode()] * 3}
            notes = _notes(install, names)
            assert notes[:2] == [None, None], notes
            assert notes[2] is not None and "host_cache_bytes_per_uid 400" in notes[2], notes
            assert len(host_cache_entries(install.prefix)) == 2
        finally:
            purge_host_cache(install.prefix)


def test_root_key_quota_share_is_never_passed(extra_install: Callable[..., Any]) -> None:
    # A share smaller than what root already uses: nothing more is kept, by anyone.
    with extra_install(host_cache_root_share=0.000001) as install:
        try:
            name = unique("share")
            text = install.blob(b"kmst-share", name)
            assert as_user(NOBODY, lambda: install.get(name, text).decode()) == {"ok": "kmst-share"}
            (note,) = _notes(install, [name])
            assert note is not None and note.startswith(
                "not kept: root's key quota would pass host_cache_root_share 1e-06"
            ), note
            assert host_cache_entries(install.prefix) == []
        finally:
            purge_host_cache(install.prefix)
