"""Fixtures of the backend contract tests: KMS in process (moto), counting the calls made."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from resolver.awsclient import SessionClients
from resolver.backend import Timings
from tests.support.kms_emulator import TEST_CREDENTIALS

REGION = TEST_CREDENTIALS["AWS_REGION"]


class Counted:
    """A botocore client whose calls are counted (`calls`), per method."""

    def __init__(self, client: Any, calls: list[str]) -> None:
        self._client, self._calls = client, calls

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(**params: Any) -> Any:
            self._calls.append(name)
            return method(**params)

        return call


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any, list[str]]]:
    """KMS in this process (moto): a key ARN, a test-side client, and the resolver's calls.

    The resolver's clients are built by its own code (resolver/awsclient.py), with the test
    credentials from the environment (the handler scrubs it; these tests run no handler).
    """
    import boto3
    from moto import mock_aws

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    calls: list[str] = []
    real = SessionClients.client

    def counted(
        self: SessionClients, service: str, region: str, deadline: float, t: Timings
    ) -> Any:
        return Counted(real(self, service, region, deadline, t), calls)

    monkeypatch.setattr(SessionClients, "client", counted)
    with mock_aws():
        client = boto3.client("kms", region_name=REGION)
        yield client.create_key()["KeyMetadata"]["Arn"], client, calls


@pytest.fixture
def as_root() -> None:
    """The keystore trusts root-owned files only: its contract runs as root (CI does)."""
    if os.geteuid() != 0:
        pytest.fail("the stored: backend's contract needs root (its keystore is root's)")
