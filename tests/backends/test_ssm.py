"""The `ssm:` backend keeps the backend contract: Parameter Store in process (moto), no root.

Besides the contract: hierarchical and simple names, versions and labels in AWS's syntax, the
types served, and the allowlist before any call.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from resolver.backend import Backend, Context, Request
from resolver.config import Config, parse
from resolver.errors import RefusedError, UnknownSecretError
from resolver.gateway import Gateway
from resolver.parameterstore import ParameterStoreBackend
from resolver.policy import user_name
from tests.backends.conftest import REGION
from tests.backends.contract import BackendContract, MemoryBudget, MemoryCache
from tests.support.names import unique

pytestmark = pytest.mark.unit


def request(name: str, selector: str = "") -> Request:
    uid = os.getuid()
    return Request("ssm", name, uid, os.getgid(), user_name(uid), b"", selector)


def context() -> Context:
    return Context(time.monotonic() + 5.0, MemoryBudget())


class TestParameterStoreBackend(BackendContract):
    expected = b"kmst-ssm-value"

    @pytest.fixture
    def config(self, aws: tuple[str, Any, list[str]]) -> Config:
        import boto3

        _, _, self.calls = aws
        self.ssm = boto3.client("ssm", region_name=REGION)
        self.cache = MemoryCache()
        self.name = unique("ssm")
        self.ssm.put_parameter(
            Name=f"/app/prod/{self.name}", Value="kmst-ssm-value", Type="SecureString"
        )
        return parse(
            {
                "region": REGION,
                "ssm_parameters": ["/app/prod/*", "kmst-*-simple-*"],
                "host_cache": False,
            }
        )

    def backend(self, config: Config) -> Backend:
        return ParameterStoreBackend(config, Gateway(config), self.cache)

    def known(self, config: Config) -> Request:
        return request(f"app/prod/{self.name}")

    def unknown(self, config: Config) -> Request | None:
        return request(f"app/prod/{unique('absent')}")

    def refused(self, config: Config) -> Request:
        return request(f"app/dev/{self.name}")  # outside ssm_parameters

    def aws_calls(self) -> int | None:
        return len(self.calls)

    def test_versions_labels_and_simple_names(self, config: Config) -> None:
        backend, name = self.backend(config), f"app/prod/{self.name}"
        self.ssm.put_parameter(
            Name=f"/{name}", Value="kmst-second", Type="SecureString", Overwrite=True
        )
        self.ssm.label_parameter_version(Name=f"/{name}", ParameterVersion=1, Labels=["blue"])
        current = backend.resolve(request(name), context())
        assert (current.payload, current.details["version"]) == (b"kmst-second", "2")
        assert backend.resolve(request(name, "#1"), context()).payload == b"kmst-ssm-value"
        labelled = backend.resolve(request(name, "#blue"), context())
        assert (labelled.payload, labelled.details["label"]) == (b"kmst-ssm-value", "blue")
        with pytest.raises(UnknownSecretError, match="ParameterVersionNotFound"):
            backend.resolve(request(name, "#9"), context())
        with pytest.raises(UnknownSecretError, match="ParameterNotFound"):
            backend.resolve(request(name, "#green"), context())
        with pytest.raises(RefusedError, match="must not start with a digit, aws or ssm"):
            backend.resolve(request(name, "#awsx"), context())
        simple = unique("simple")
        self.ssm.put_parameter(Name=simple, Value="kmst-plain", Type="String")
        assert backend.resolve(request(simple), context()).payload == b"kmst-plain"

    def test_only_the_configured_types_are_served(self, config: Config) -> None:
        name = unique("simple")
        self.ssm.put_parameter(Name=name, Value="a,b", Type="StringList")
        with pytest.raises(RefusedError, match="type StringList is not in ssm_types"):
            self.backend(config).resolve(request(name), context())
        lists = Config(**{**config.__dict__, "ssm_types": ("StringList",)})
        assert self.backend(lists).resolve(request(name), context()).payload == b"a,b"
        with pytest.raises(RefusedError, match="type SecureString is not in ssm_types"):
            self.backend(lists).resolve(request(f"app/prod/{self.name}"), context())

    def test_the_allowlist_comes_first_and_makes_no_call(self, config: Config) -> None:
        with pytest.raises(RefusedError, match=r"'/app/dev/.*' is not in ssm_parameters"):
            self.backend(config).resolve(request(f"app/dev/{self.name}"), context())
        assert self.calls == []

    def test_one_call_per_host_whoever_asks(self, config: Config) -> None:
        on = Config(**{**config.__dict__, "host_cache": True})
        backend = ParameterStoreBackend(on, Gateway(on), self.cache)
        name = f"app/prod/{self.name}"
        assert backend.resolve(request(name), context()).details["source"] == "parameterstore"
        other = Request("ssm", name, 65534, 65534, "nobody", b"", "")
        again = backend.resolve(other, context())
        assert (again.payload, again.details["source"]) == (b"kmst-ssm-value", "hostcache")
        assert self.calls == ["get_parameter"]
