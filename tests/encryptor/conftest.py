"""Fixtures for the build side: a KMS emulator, the real `kmskeys` script, leak checks.

Every plaintext a test encrypts comes from `secret_of`, which registers a distinctive marker; at
the end of each test every captured stdout/stderr (and, at the end of the session, the emulator's
log) is scanned for those markers.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kmskeys.blob import MODE_ENVELOPE, parse_blob
from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator

KMSKEYS = Path(sys.executable).with_name("kmskeys")

_MARKERS: list[bytes] = []


def secret_of(size: int) -> bytes:
    """A plaintext of `size` bytes made of one repeated marker that no output may contain."""
    marker = f"kmst-plain-{secrets.token_hex(8)}|".encode()
    _MARKERS.append(marker)
    return (marker * (size // len(marker) + 1))[:size]


def assert_no_plaintext(*outputs: bytes | str) -> None:
    """Fail if any registered marker (or its first 16 bytes) shows in `outputs`."""
    for output in outputs:
        data = output.encode() if isinstance(output, str) else output
        for marker in _MARKERS:
            assert marker[:16] not in data, "a plaintext marker leaked into test output"


def open_blob(
    client: Any, text: str, name: str, user: str | None = None, unit: str | None = None
) -> bytes:
    """Decrypt a blob exactly as docs/blob-format.md tells the resolver to."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from kmskeys.blob import envelope_aad

    blob = parse_blob(text, allow_legacy=True)
    context = blob.encryption_context(name, user, unit)
    kwargs: dict[str, Any] = {"CiphertextBlob": blob.ciphertext, "EncryptionContext": context}
    if blob.key_arn is not None:
        kwargs["KeyId"] = blob.key_arn
    response = client.decrypt(**kwargs)
    if blob.key_arn is not None:
        assert response["KeyId"] == blob.key_arn
    if blob.mode != MODE_ENVELOPE:
        return bytes(response["Plaintext"])
    assert blob.nonce is not None and blob.sealed is not None
    return AESGCM(response["Plaintext"]).decrypt(
        blob.nonce, blob.sealed, envelope_aad(blob, context)
    )


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsEmulator]:
    """A moto server on 127.0.0.1 for the whole session; its log is scanned for plaintext."""
    log = tmp_path_factory.mktemp("kms") / "moto.log"
    with KmsEmulator(log=log) as emu:
        yield emu
    assert_no_plaintext(log.read_bytes())


@pytest.fixture(scope="session")
def key_arn(emulator: KmsEmulator) -> str:
    """A symmetric key in the emulator."""
    arn: str = emulator.client().create_key(Description="kmst encryptor")["KeyMetadata"]["Arn"]
    return arn


@pytest.fixture
def aws_env(tmp_path: Path) -> dict[str, str]:
    """An environment with test credentials only: no real profile, config or IMDS is consulted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(TEST_CREDENTIALS)
    env["AWS_CONFIG_FILE"] = str(tmp_path / "aws-config-absent")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "aws-credentials-absent")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.pop("KMSKEYS_KEY_ID", None)
    return env


@pytest.fixture
def cli_env(aws_env: dict[str, str], emulator: KmsEmulator) -> dict[str, str]:
    """aws_env pointed at the emulator through AWS_ENDPOINT_URL."""
    return {**aws_env, "AWS_ENDPOINT_URL": emulator.url}


class Cli:
    """Runs the real `kmskeys` console script and keeps every output for the leak check."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.outputs: list[bytes] = []

    def __call__(
        self,
        *args: str,
        stdin: bytes = b"",
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            [str(KMSKEYS), *args],
            input=stdin,
            capture_output=True,
            env=self.env if env is None else env,
            timeout=timeout,
            check=False,
        )
        self.outputs += [proc.stdout, proc.stderr]
        return proc


@pytest.fixture
def kmskeys_cli(cli_env: dict[str, str]) -> Iterator[Cli]:
    """The `kmskeys` script against the emulator; its outputs are scanned after the test."""
    cli = Cli(cli_env)
    yield cli
    assert_no_plaintext(*cli.outputs)


class AwsErrorStub:
    """A local HTTP endpoint that answers every KMS call with one AWS JSON error."""

    def __init__(self, code: str, status: int = 400) -> None:
        self.code, self.status, self.requests = code, status, 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                stub.requests += 1
                body = json.dumps({"__type": stub.code, "message": "stubbed error"}).encode()
                self.send_response(stub.status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> AwsErrorStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
