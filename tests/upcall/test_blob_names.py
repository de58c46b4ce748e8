"""Through the real upcall: one blob is one host-cache entry and one Decrypt, whatever its
spelling; a blob made for another name or user is refused locally, saying so, with no KMS call."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kmskeys import Key, KeyRejectedError, Keyring
from kmskeys.blob import parse_blob
from tests.support.names import unique
from tests.support.requester import NOBODY, as_user
from tests.upcall.harness import Install

pytestmark = pytest.mark.upcall

URLSAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.fixture
def resolver(resolver: Install) -> Iterator[Install]:
    """The session install; the blob files a test deploys are removed after it (a misnamed
    one left behind would fail every later doctor run on this install)."""
    before = set(resolver.blob_dir.rglob("*.kms"))
    try:
        yield resolver
    finally:
        for path in set(resolver.blob_dir.rglob("*.kms")) - before:
            path.unlink()


def _ask(install: Install, name: str, blob: str | bytes = b"") -> bytes:
    """request_key + read in a fresh session keyring: every call is a new upcall (no key, no
    negative key, no per-thread memory of get_secret in the way)."""
    Keyring.join_session()
    return Key.request(install.description(name), blob).read()


def _refused(install: Install, name: str, blob: str | bytes = b"") -> str:
    """The resolver's log line for a request it refused."""
    with pytest.raises(KeyRejectedError):
        _ask(install, name, blob)
    line = install.log.wait_for(name)
    assert " outcome=refused " in line, line
    return line


def test_every_accepted_spelling_is_one_entry_and_one_decrypt(resolver: Install) -> None:
    name = unique("spelling")
    text = resolver.blob(b"kmst-one-entry", name)
    spellings = [
        text,
        f"{text}\n",  # as `kmskeys encrypt --output` writes a file
        f"  {text}\r\n",
        f"\t{text} ",
        parse_blob(text).identity(),  # its version-1 form: the same ciphertext, unrecorded
    ]
    for spelling in spellings:
        assert _ask(resolver, name, spelling) == b"kmst-one-entry"
    resolver.deploy(name, f"{text}\n")
    assert _ask(resolver, name) == b"kmst-one-entry"  # blob_dir/NAME.kms, the same blob
    lines = [resolver.log.wait_for(name) for _ in range(len(spellings) + 1)]
    assert all(" outcome=ok " in line for line in lines), lines
    assert sum(" source=hostcache " in line for line in lines) == len(spellings), lines
    assert resolver.decrypts() == 1


def test_every_other_spelling_is_refused_locally(resolver: Install) -> None:
    name = unique("respelled")
    for _ in range(20):  # a ciphertext whose text has a '-' or '_' (about 9 in 10 do)
        text = resolver.blob(b"kmst-respelled", name)
        head, body = text.split(":")
        if "-" in body or "_" in body:
            break
    spellings = {
        f"kmsk02:{body}": "non-canonical version prefix",
        f"kmsk0002:{body}": "non-canonical version prefix",
        f"{head}:{body}{'=' * (-len(body) % 4)}==": "not unpadded base64url",
        # Standard base64, as legacy blobs are written.
        f"{head}:{body.translate(str.maketrans('-_', '+/'))}": "not unpadded base64url",
        f"KMSK2:{body}": "unknown prefix",
        f"{head}:{body[:64]}\n{body[64:]}": "not unpadded base64url",
    }
    if len(body) % 4:
        # The last character's unused low bits are zero; setting one is another spelling.
        loose = body[:-1] + URLSAFE[URLSAFE.index(body[-1]) + 1]
        spellings[f"{head}:{loose}"] = "not canonical base64url"
    for spelling, reason in spellings.items():
        line = _refused(resolver, name, spelling)
        assert "inline blob: " in line and reason in line, line
        assert body[:16] not in line  # the blob is never logged
    assert resolver.decrypts() == 0
    assert _ask(resolver, name, text) == b"kmst-respelled"
    assert resolver.decrypts() == 1


def test_a_blob_deployed_under_another_name_is_refused_locally(resolver: Install) -> None:
    right = unique("db-password")
    wrong = right.replace("password", "pasword")
    text = resolver.blob(b"kmst-misnamed", right)
    mismatch = f"blob was encrypted for '{right}', not '{wrong}'"
    resolver.deploy(wrong, f"{text}\n")
    assert f'reason="blob_dir blob: {mismatch}"' in _refused(resolver, wrong)
    assert f'reason="inline blob: {mismatch}"' in _refused(resolver, wrong, text)
    assert resolver.decrypts() == 0
    # The same blob under its own name resolves: the check refuses nothing KMS would accept.
    resolver.deploy(right, f"{text}\n")
    assert _ask(resolver, right) == b"kmst-misnamed"
    assert resolver.decrypts() == 1


def test_a_blob_for_another_user_is_refused_locally(resolver: Install) -> None:
    name = unique("userbound")
    text = resolver.blob(b"kmst-for-root", name, user="root")

    def ask() -> str:
        return _ask(resolver, name, text).decode()

    assert as_user(NOBODY, ask) == {"error": "KeyRejectedError", "errno": 129}
    line = resolver.log.wait_for(name)
    assert "blob was encrypted for user 'root', not 'nobody'" in line, line
    assert resolver.decrypts() == 0
    assert _ask(resolver, name, text) == b"kmst-for-root"


def test_version_1_blobs_keep_working_and_kms_still_binds_them(resolver: Install) -> None:
    name, other = unique("old"), unique("oldother")
    old = parse_blob(resolver.blob(b"kmst-version-1", name)).identity()
    assert old.startswith("kmsk1:")
    resolver.deploy(name, f"{old}\n")
    assert _ask(resolver, name) == b"kmst-version-1"
    assert " outcome=ok " in resolver.log.wait_for(name)
    # It records no name: nothing to check locally, and KMS refuses it under another one.
    resolver.deploy(other, f"{old}\n")
    assert "InvalidCiphertextException" in _refused(resolver, other)
    assert resolver.decrypts() == 2
