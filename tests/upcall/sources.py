"""A resolver install that reads Secrets Manager and Parameter Store from the moto server.

The session's moto server and counting proxy (tests/upcall/conftest.py `kms_backend`) serve
KMS, Secrets Manager and SSM on one port; the install's `sm:` and `ssm:` prefixes are unique to
it, and its allowlists name only this suite's secrets:

- `sm:NAME` reads the secret `app/NAME`, allowed when NAME matches `kmst-*-sm*` (so a name made
  by `unique("sm...")` is allowed and `unique("out")` is not);
- `ssm:NAME` reads `/NAME`, allowed under `/kmst/`;
- names matching `kmst-*-smshort*` / `kmst/*/short*` have a ttl of MIN_TTL, and those matching
  `kmst-*-smnobody*` are for `nobody` alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kmskeys import Key
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import KmsProxy
from tests.support.names import unique, unique_prefix
from tests.support.ttl import MIN_TTL
from tests.upcall.harness import Install, installed

SM_PATH = "app/"
POLICY = f"""
[sm."kmst-*-smshort*"]
ttl = {MIN_TTL}

[sm."kmst-*-smnobody*"]
allow_users = ["nobody"]

[ssm."kmst/*/short*"]
ttl = {MIN_TTL}
"""


@dataclass
class Sources:
    """The install, its two prefixes, and test-side clients of the emulator."""

    install: Install
    sm_prefix: str
    ssm_prefix: str

    @property
    def proxy(self) -> KmsProxy:
        assert self.install.proxy is not None
        return self.install.proxy

    def sm(self) -> Any:
        """A boto3 Secrets Manager client on the emulator (test side)."""
        return self.install.emulator.client("secretsmanager")

    def ssm(self) -> Any:
        """A boto3 SSM client on the emulator (test side)."""
        return self.install.emulator.client("ssm")

    def secret(self, value: object, stem: str = "sm", **extra: Any) -> str:
        """A new secret under the allowed path: its kmskeys NAME. JSON for a dict, text for
        a str, SecretBinary for bytes."""
        name = unique(stem)
        body: dict[str, Any] = (
            {"SecretBinary": value}
            if isinstance(value, bytes)
            else {"SecretString": value if isinstance(value, str) else json.dumps(value)}
        )
        self.sm().create_secret(Name=SM_PATH + name, **body, **extra)
        return name

    def parameter(self, value: str, stem: str = "p", kind: str = "SecureString") -> str:
        """A new parameter `/kmst/UNIQUE/STEM`: its kmskeys NAME (no leading /)."""
        name = f"kmst/{unique('ssm')}/{stem}"
        self.ssm().put_parameter(Name=f"/{name}", Value=value, Type=kind)
        return name

    def sm_desc(self, ref: str) -> str:
        return f"{self.sm_prefix}:{ref}"

    def ssm_desc(self, ref: str) -> str:
        return f"{self.ssm_prefix}:{ref}"

    def calls(self, operation: str = "GetSecretValue") -> int:
        return self.proxy.count(operation)


def ask(desc: str) -> bytes:
    """request_key + read of a whole description, through the real upcall on a miss (not
    get_secret, whose per-thread memory of recent serials would skip a new session's search)."""
    return Key.request(desc, b"").read()


@contextmanager
def sources_installed(
    emulator: KmsEmulator, proxy: KmsProxy, key_arn: str, **settings: Any
) -> Iterator[Sources]:
    """An install reading this suite's secrets and parameters; removed after."""
    sm_prefix, ssm_prefix = unique_prefix(), unique_prefix()
    values: dict[str, Any] = {
        "sm_prefix": sm_prefix,
        "ssm_prefix": ssm_prefix,
        "sm_secrets": [f"{SM_PATH}kmst-*-sm*"],
        "sm_path_prefix": SM_PATH,
        "ssm_parameters": ["/kmst/*"],
        **settings,
    }
    with installed(emulator, proxy, key_arn, names=POLICY, **values) as install:
        yield Sources(install, sm_prefix, ssm_prefix)
