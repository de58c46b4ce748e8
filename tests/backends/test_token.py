"""The `token:` backend keeps the backend contract: a SoftHSM2 token (SoftHSM's own
configuration, tests/support/softhsm.py `system_token`), blobs in a root-owned blob_dir.

In this process: the host cache is an in-memory one (the real one is root's keyring, exercised
through the upcall in tests/upcall/test_token_backend.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmskeys.tokenblob import BLOB_SUFFIX, seal_blob
from resolver.backend import Backend, Request
from resolver.config import Config, parse
from resolver.errors import ServiceUnavailableError
from resolver.pkcs11seal import TokenUnavailableError, public_key
from resolver.policy import user_name
from resolver.tokenbackend import TokenBlobBackend
from tests.backends.contract import BackendContract, MemoryBudget, MemoryCache
from tests.support.names import unique
from tests.support.softhsm import Token, missing, refresh_in_process, system_token

pytestmark = [pytest.mark.tokens, pytest.mark.usefixtures("as_root")]

VALUE = b"kmst-token-contract-value"


@pytest.fixture(scope="module")
def token() -> Iterator[Token]:
    """A SoftHSM2 token the resolver's own configuration sees; deleted after."""
    lacking = missing()
    if lacking:
        pytest.fail("the token: contract cannot run here; missing: " + "; ".join(lacking))
    with system_token() as made:
        refresh_in_process(made.module)  # this process may have initialised SoftHSM before
        yield made


class TestTokenBackend(BackendContract):
    expected = VALUE

    @pytest.fixture
    def config(self, token: Token, tmp_path: Path) -> Config:
        self.blob_dir = tmp_path / "blobs"
        self.blob_dir.mkdir(mode=0o755)
        pin = token.write_pin(tmp_path / "token.pin")
        self.cache = MemoryCache()
        self.settings: dict[str, Any] = {
            "blob_dir": str(self.blob_dir),
            "host_cache": False,  # the pipeline's own backend would use root's keyring
            "token_module": token.module,
            "token_label": token.label,
            "token_key_label": token.key_label,
            "token_pin_file": str(pin),
        }
        config = parse(self.settings)
        from resolver.pkcs11seal import settings_from

        self.spki = public_key(settings_from(config))
        return config

    def backend(self, config: Config) -> Backend:
        return TokenBlobBackend(config, self.cache)

    def deploy(self, name: str, value: bytes = VALUE, **options: Any) -> None:
        path = self.blob_dir / f"{name}{BLOB_SUFFIX}"
        path.write_text(seal_blob(self.spki, value, name, **options).to_text() + "\n")

    def _request(self, name: str, callout: bytes = b"") -> Request:
        uid = os.getuid()
        return Request("token", name, uid, os.getgid(), user_name(uid), callout)

    def known(self, config: Config) -> Request:
        name = unique("contract")
        self.deploy(name)
        return self._request(name)

    def unknown(self, config: Config) -> Request | None:
        return self._request(unique("absent"))

    def refused(self, config: Config) -> Request:
        name, other = unique("misnamed"), unique("other")
        self.deploy(other)
        (self.blob_dir / f"{other}{BLOB_SUFFIX}").rename(self.blob_dir / f"{name}{BLOB_SUFFIX}")
        return self._request(name)

    def test_an_inline_blob_is_refused(self, config: Config) -> None:
        name = unique("inline")
        blob = seal_blob(self.spki, VALUE, name).to_text().encode()
        with pytest.raises(Exception) as caught:
            self.backend(config).resolve(self._request(name, blob), self.context())
        assert "blob_dir only" in str(caught.value)

    def test_a_misnamed_blob_costs_the_token_nothing(self, config: Config) -> None:
        budget = MemoryBudget(0)  # any token operation would spend from it first
        with pytest.raises(Exception) as caught:
            self.backend(config).resolve(self.refused(config), self.context(budget))
        assert "encrypted for" in str(caught.value)

    def test_each_token_operation_spends_the_budget(self, config: Config) -> None:
        budget = MemoryBudget(5)
        self.backend(config).resolve(self.known(config), self.context(budget))
        assert budget.spent == 1

    def test_the_host_cache_answers_and_answers_stale_when_the_token_is_gone(
        self, config: Config, tmp_path: Path
    ) -> None:
        cached = parse({**self.settings, "host_cache": True, "stale_grace": 3600})
        request = self.known(config)
        budget = MemoryBudget()
        first = self.backend(cached).resolve(request, self.context(budget))
        assert first.payload == VALUE and budget.spent == 1
        again = self.backend(cached).resolve(request, self.context(budget))
        assert again.payload == VALUE and again.details["source"] == "hostcache"
        assert budget.spent == 1
        # Past freshness and the module gone: the entry answers, stale, with the stale ttl.
        module = tmp_path / "gone" / "libsofthsm2.so"
        gone = parse({**self.settings, "host_cache": True, "ttl": 1, "token_module": str(module)})
        for desc, (stamp, plain, epoch) in list(self.cache.entries.items()):
            self.cache.entries[desc] = (stamp - 10, plain, epoch)
        stale = self.backend(gone).resolve(request, self.context())
        assert (stale.payload, stale.stale, stale.ttl) == (VALUE, True, gone.stale_ttl)
        assert "does not exist" in stale.details["reason"]
        # Without an entry there is nothing to serve: the class is EAGAIN, never a refusal.
        self.cache.entries.clear()
        with pytest.raises(TokenUnavailableError) as caught:
            self.backend(gone).resolve(request, self.context())
        assert isinstance(caught.value, ServiceUnavailableError)
