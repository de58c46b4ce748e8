"""The `stored:` backend keeps the backend contract: a real keystore (root's), no upcall.

The keystore trusts root-owned files only, so these run as root; sealed, KMS runs in process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from resolver.backend import Backend, Request
from resolver.config import Config, parse
from resolver.stored import StoredBackend
from tests.backends.conftest import REGION
from tests.backends.contract import BackendContract
from tests.support.names import unique

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("as_root")]

HOST = "arn:aws:ec2:us-east-1:123456789012:instance/i-0a1b2c3d4e5f60718"


class TestStoredBackend(BackendContract):
    def settings(self, tmp_path: Path) -> dict[str, Any]:
        keystore = tmp_path / "keystore"
        keystore.mkdir(mode=0o700)
        return {"keystore_dir": str(keystore)}

    @pytest.fixture
    def config(self, tmp_path: Path) -> Config:
        return parse(self.settings(tmp_path))

    def backend(self, config: Config) -> Backend:
        return StoredBackend(config)

    def _request(self, name: str, callout: bytes, qualifier: str = "") -> Request:
        return Request("stored", name, os.getuid(), os.getgid(), "root", callout, qualifier)

    def known(self, config: Config) -> Request:
        return self._request(unique("contract"), b"32")

    def unknown(self, config: Config) -> Request | None:
        # Version 1 is made on the first request; a later version only by `stored rotate`.
        return self._request(unique("absent"), b"", "#v2")

    def refused(self, config: Config) -> Request:
        return self._request(unique("badsize"), b"7")


class TestSealedStoredBackend(TestStoredBackend):
    @pytest.fixture
    def config(self, tmp_path: Path, aws: tuple[str, Any, list[str]]) -> Config:
        arn, _client, self.calls = aws
        sealed = {"seal": "kms", "seal_key_arn": arn, "seal_host": HOST, "region": REGION}
        return parse({**self.settings(tmp_path), **sealed})

    def aws_calls(self) -> int | None:
        return len(self.calls)
