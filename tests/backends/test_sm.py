"""The `sm:` backend keeps the backend contract: Secrets Manager in process (moto), no root.

Besides the contract: the allowlist comes before the host cache and makes no call, one entry
serves every field of a secret, and each hostile answer of the service gets its class.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from resolver.backend import Backend, Context, Request
from resolver.config import Config, parse
from resolver.errors import RefusedError, ServiceUnavailableError, UnknownSecretError
from resolver.gateway import Gateway
from resolver.policy import user_name
from resolver.secretsmanager import SecretsManagerBackend
from tests.backends.conftest import REGION
from tests.backends.contract import BackendContract, MemoryBudget, MemoryCache
from tests.support.names import unique

pytestmark = pytest.mark.unit

VALUE = {"username": "kmst-user", "password": "kmst-sm-password", "port": 5432}


def request(name: str, selector: str = "") -> Request:
    uid = os.getuid()
    return Request("sm", name, uid, os.getgid(), user_name(uid), b"", selector)


def context(budget: MemoryBudget | None = None) -> Context:
    return Context(time.monotonic() + 5.0, budget or MemoryBudget())


class TestSecretsManagerBackend(BackendContract):
    expected = b"kmst-sm-password"

    @pytest.fixture
    def config(self, aws: tuple[str, Any, list[str]]) -> Config:
        import boto3

        _, _, self.calls = aws
        self.sm = boto3.client("secretsmanager", region_name=REGION)
        self.cache = MemoryCache()
        self.name = unique("sm")
        self.sm.create_secret(Name=f"prod/{self.name}", SecretString=json.dumps(VALUE))
        return parse(
            {
                "region": REGION,
                "sm_secrets": ["prod/kmst-*"],
                "sm_path_prefix": "prod/",
                # The pipeline's own backend would use root's persistent keyring: off here.
                "host_cache": False,
            }
        )

    def backend(self, config: Config) -> Backend:
        return SecretsManagerBackend(config, Gateway(config), self.cache)

    def known(self, config: Config) -> Request:
        return request(self.name, "#password")

    def unknown(self, config: Config) -> Request | None:
        return request(unique("absent"))

    def refused(self, config: Config) -> Request:
        return request(f"other-{self.name}")  # outside sm_secrets

    def aws_calls(self) -> int | None:
        return len(self.calls)

    def cached(self, config: Config) -> SecretsManagerBackend:
        on = Config(**{**config.__dict__, "host_cache": True})
        return SecretsManagerBackend(on, Gateway(on), self.cache)

    def test_outside_the_allowlist_no_call_and_no_cache_lookup(self, config: Config) -> None:
        looked: list[str] = []
        self.cache.lookup = looked.append  # type: ignore[method-assign,assignment]
        with pytest.raises(RefusedError, match="not in sm_secrets"):
            self.cached(config).resolve(request(f"other-{self.name}"), context())
        assert (self.calls, looked) == ([], [])

    def test_every_field_and_every_uid_share_one_call(self, config: Config) -> None:
        backend, budget = self.cached(config), MemoryBudget()
        first = backend.resolve(request(self.name, "#password"), context(budget))
        assert first.payload == b"kmst-sm-password"
        assert first.details["source"] == "secretsmanager" and first.details["version"]
        for selector, value in (("#username", b"kmst-user"), ("#port", b"5432"), ("", None)):
            other = Request("sm", self.name, 65534, 65534, "nobody", b"", selector)
            result = backend.resolve(other, context(budget))
            assert result.details["source"] == "hostcache"
            assert result.details["version"] == first.details["version"]
            assert result.payload == (value or json.dumps(VALUE).encode())
        assert (self.calls, budget.spent) == (["get_secret_value"], 1)

    def test_stages_and_version_ids(self, config: Config) -> None:
        backend = self.backend(config)
        old = backend.resolve(request(self.name), context())
        self.sm.put_secret_value(SecretId=f"prod/{self.name}", SecretString="kmst-rotated")
        assert backend.resolve(request(self.name), context()).payload == b"kmst-rotated"
        previous = backend.resolve(request(self.name, "#stage=AWSPREVIOUS"), context())
        assert previous.payload == old.payload and previous.details["stage"] == "AWSPREVIOUS"
        by_id = backend.resolve(request(self.name, f"#version={old.details['version']}"), context())
        assert by_id.payload == old.payload
        with pytest.raises(UnknownSecretError, match="no version kmst-nolabel"):
            backend.resolve(request(self.name, "#stage=kmst-nolabel"), context())
        with pytest.raises(RefusedError, match="spelled"):
            backend.resolve(request(self.name, "#stage=AWSCURRENT"), context())

    def test_the_hostile_answers_each_get_their_class(self, config: Config) -> None:
        backend, secret = self.backend(config), f"prod/{self.name}"
        with pytest.raises(UnknownSecretError, match="has no field 'nope'"):
            backend.resolve(request(self.name, "#nope"), context())
        self.sm.put_secret_value(SecretId=secret, SecretString="kmst-not-json")
        with pytest.raises(RefusedError, match="not JSON"):
            backend.resolve(request(self.name, "#password"), context())
        self.sm.put_secret_value(SecretId=secret, SecretString=json.dumps({"password": None}))
        with pytest.raises(RefusedError, match="is null"):
            backend.resolve(request(self.name, "#password"), context())
        self.sm.put_secret_value(SecretId=secret, SecretString="x" * 32768)
        with pytest.raises(RefusedError, match="32768 bytes: a kernel key holds at most 32767"):
            backend.resolve(request(self.name), context())
        self.sm.delete_secret(SecretId=secret, RecoveryWindowInDays=7)
        with pytest.raises(UnknownSecretError, match="marked for deletion"):
            backend.resolve(request(self.name), context())
        self.sm.restore_secret(SecretId=secret)
        self.sm.delete_secret(SecretId=secret, ForceDeleteWithoutRecovery=True)
        with pytest.raises(UnknownSecretError, match="ResourceNotFoundException"):
            backend.resolve(request(self.name), context())

    def test_binary_secrets_are_served_as_they_are(self, config: Config) -> None:
        name = unique("bin")
        self.sm.create_secret(Name=f"prod/{name}", SecretBinary=b"\x00kmst\xff")
        assert self.backend(config).resolve(request(name), context()).payload == b"\x00kmst\xff"
        with pytest.raises(RefusedError, match="binary"):
            self.backend(config).resolve(request(name, "#password"), context())

    def test_a_stale_entry_answers_only_while_the_service_is_unavailable(
        self, config: Config, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        backend = self.cached(config)
        assert backend.resolve(request(self.name, "#password"), context()).payload
        ttl0 = Config(**{**backend.config.__dict__, "ttl": 1, "stale_ttl": 7})
        backend = SecretsManagerBackend(ttl0, Gateway(ttl0), self.cache)
        time.sleep(1.1)

        def down(*_: Any, **__: Any) -> Any:
            raise ServiceUnavailableError("Secrets Manager ThrottlingException (HTTP 400)")

        monkeypatch.setattr(Gateway, "call", down)
        stale = backend.resolve(request(self.name, "#password"), context())
        assert (stale.payload, stale.stale, stale.ttl) == (b"kmst-sm-password", True, 7)
        assert "Throttling" in stale.details["reason"]

        def gone(*_: Any, **__: Any) -> Any:
            raise UnknownSecretError("Secrets Manager ResourceNotFoundException")

        monkeypatch.setattr(Gateway, "call", gone)
        with pytest.raises(UnknownSecretError):
            backend.resolve(request(self.name, "#password"), context())
        assert self.cache.entries == {}  # dropped: a deleted secret is never served stale
