"""The `kms:` backend keeps the backend contract, without root: KMS in process, inline blobs."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

import encryptor
from resolver.backend import Backend, Context, Request
from resolver.blobs import BlobBackend
from resolver.config import Config, parse
from resolver.gateway import Gateway
from resolver.policy import user_name
from tests.backends.conftest import REGION
from tests.backends.contract import BackendContract, MemoryBudget, MemoryCache
from tests.support.names import unique

pytestmark = pytest.mark.unit

VALUE = b"kmst-contract-value"


class TestKmsBackend(BackendContract):
    expected = VALUE

    @pytest.fixture
    def config(self, aws: tuple[str, Any, list[str]]) -> Config:
        self.arn, self.client, self.calls = aws
        self.cache = MemoryCache()
        return parse(
            {
                "key_arns": [self.arn],
                "region": REGION,
                # The pipeline's own backend would use root's persistent keyring: off here.
                "host_cache": False,
                # Missing: a name without an inline blob is unknown, root or not.
                "blob_dir": f"/nonexistent/{unique('blobs')}",
            }
        )

    def backend(self, config: Config) -> Backend:
        return BlobBackend(config, Gateway(config), self.cache)

    def _request(self, name: str, callout: bytes) -> Request:
        uid = os.getuid()
        return Request("kms", name, uid, os.getgid(), user_name(uid), callout)

    def known(self, config: Config) -> Request:
        name = unique("contract")
        blob = encryptor.encrypt(VALUE, name, self.arn, client=self.client).to_text()
        return self._request(name, blob.encode())

    def unknown(self, config: Config) -> Request | None:
        return self._request(unique("absent"), b"")

    def refused(self, config: Config) -> Request:
        return self._request(unique("garbled"), b"kmsk1:AAAA")

    def aws_calls(self) -> int | None:
        return len(self.calls)

    def test_allowlist_once_and_a_host_cache_hit_makes_no_call(
        self, config: Config, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import resolver.kms

        cached = Config(**{**config.__dict__, "host_cache": True})
        checks: list[str] = []
        real = resolver.kms.check_key

        def counted(config: Config, blob: Any) -> tuple[str, str]:
            checks.append(blob.key_arn)
            return real(config, blob)

        monkeypatch.setattr(resolver.kms, "check_key", counted)
        request = self.known(config)
        backend = self.backend(cached)
        budget = MemoryBudget()
        first = backend.resolve(request, Context(time.monotonic() + 5, budget))
        assert (first.payload, checks, self.calls, budget.spent) == (
            VALUE,
            [self.arn],
            ["decrypt"],
            1,
        )
        again = backend.resolve(request, Context(time.monotonic() + 5, budget))
        assert again.payload == VALUE and again.details["source"] == "hostcache"
        assert (len(checks), self.calls, budget.spent) == (2, ["decrypt"], 1)

    def test_a_key_outside_the_allowlist_makes_no_call(self, config: Config) -> None:
        from resolver.errors import RefusedError

        other = self.client.create_key()["KeyMetadata"]["Arn"]
        name = unique("foreign")
        blob = encryptor.encrypt(VALUE, name, other, client=self.client).to_text()
        with pytest.raises(RefusedError, match="key not allowed"):
            self.backend(config).resolve(
                self._request(name, blob.encode()), Context(time.monotonic() + 5, MemoryBudget())
            )
        assert self.calls == []
