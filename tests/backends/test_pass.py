"""The `pass:` backend keeps the backend contract: a test user's real store, key and agent.

The entries are made by the real `pass` (tests/support/passgpg.py), decrypted by the real gpg
as that user; no upcall (tests/upcall/test_pass_backend.py has those).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from resolver.backend import Backend, Request
from resolver.config import Config, parse
from resolver.passbackend import PassBackend
from tests.backends.contract import BackendContract
from tests.support.passgpg import PassOwner, missing, pass_user, scratch

pytestmark = [pytest.mark.tokens, pytest.mark.usefixtures("as_root")]


@pytest.fixture(scope="module")
def owner() -> Iterator[PassOwner]:
    """A test user with a populated store; its agent unlocked."""
    lacking = missing()
    if lacking:
        pytest.fail("the pass: contract cannot run here; missing: " + "; ".join(lacking))
    with scratch() as base, pass_user(base) as made:
        yield made


class TestPassBackend(BackendContract):
    expected = b"hunter2"

    @pytest.fixture
    def config(self, owner: PassOwner, tmp_path: Path) -> Config:
        owner.start_agent_if_stopped()
        owner.unlock()
        self.owner = owner
        return parse({"pass_prefix": "pass", "pass": {"email/*": {"ttl": 42}}})

    def backend(self, config: Config) -> Backend:
        return PassBackend(config)

    def _request(self, name: str, qualifier: str = "", callout: bytes = b"") -> Request:
        pw = self.owner.pw
        return Request("pass", name, pw.pw_uid, pw.pw_gid, pw.pw_name, callout, qualifier)

    def known(self, config: Config) -> Request:
        return self._request("email/work")

    def unknown(self, config: Config) -> Request | None:
        return self._request("email/nothere")

    def refused(self, config: Config) -> Request:
        return self._request("email/work", "#bogus")

    def test_the_rule_ttl_wins_and_pass_ttl_is_the_default(self, config: Config) -> None:
        backend = self.backend(config)
        assert backend.resolve(self.known(config), self.context()).ttl == 42
        other = self._request("empty-first", "#field=login")
        result = backend.resolve(other, self.context())
        assert (result.payload, result.ttl) == (b"bob", config.pass_ttl)

    def test_a_callout_is_refused(self, config: Config) -> None:
        with pytest.raises(Exception) as caught:
            self.backend(config).resolve(self._request("email/work", callout=b"x"), self.context())
        assert "no callout" in str(caught.value)
