"""Several regions: a multi-Region key falls back to its replica's region when one region fails.

One moto server holds a multi-Region key in us-east-1 and its replica (ReplicateKey) in
eu-west-1; the fault proxy drops every Decrypt signed for us-east-1 (the region is in the
SigV4 credential scope). A single-Region key gets no fallback, and the log says why.

moto cannot decrypt a multi-Region key's ciphertext in any region: its ciphertext header keeps
36 bytes of key id, and `mrk-` ids have 40 (moto/kms/utils.py, CIPHERTEXT_HEADER_FORMAT). So the
replica region's Decrypt is answered by the proxy, as KMS answers it (KeyId: the replica's ARN),
after checking that the resolver asked that region for the replica's ARN with the request's
encryption context.
"""

from __future__ import annotations

import base64
import json

import pytest

from kmskeys import Key, TemporarilyUnavailableError
from tests.faults.conftest import FAULT_SETTINGS
from tests.support.kms_emulator import KmsEmulator
from tests.support.kms_proxy import DROP, Fault, KmsProxy, ProxiedRequest
from tests.support.names import unique
from tests.upcall.harness import installed

pytestmark = pytest.mark.faults

PRIMARY, REPLICA = "us-east-1", "eu-west-1"


class Regions:
    """The fault hook: the primary region is down, the replica answers for SECRET."""

    def __init__(self) -> None:
        self.asked: list[dict[str, object]] = []

    def __call__(self, request: ProxiedRequest) -> object:
        scope = request.headers.get("Authorization", "")
        if request.operation != "Decrypt" or f"/{PRIMARY}/kms/" in scope:
            return DROP if request.operation == "Decrypt" else None
        if f"/{REPLICA}/kms/" not in scope:
            return None
        body = json.loads(request.body)
        self.asked.append(body)
        if not str(body.get("KeyId", "")).startswith("arn:aws:kms:eu-west-1:"):
            return None  # not a replica: moto answers (and refuses)
        answer = {"KeyId": body["KeyId"], "Plaintext": base64.b64encode(SECRET).decode()}
        return Fault(200, json.dumps(answer).encode())


SECRET = b"kmst-replicated"


def test_a_multi_region_key_is_decrypted_by_its_replica_when_a_region_fails(
    fault_backend: tuple[KmsEmulator, KmsProxy, str], session_keyring: object
) -> None:
    emulator, proxy, single = fault_backend
    kms = emulator.client()
    mrk = kms.create_key(Description="kmst mrk", MultiRegion=True)["KeyMetadata"]["Arn"]
    # moto looks the key up by its id only (an ARN is a KeyError there).
    key_id = mrk.rpartition("/")[2]
    replica = kms.replicate_key(KeyId=key_id, ReplicaRegion=REPLICA)["ReplicaKeyMetadata"]["Arn"]
    assert replica == mrk.replace(f":{PRIMARY}:", f":{REPLICA}:")
    with installed(
        emulator,
        proxy,
        mrk,
        region=[PRIMARY, REPLICA],
        key_arns=[mrk, single],
        **FAULT_SETTINGS,
    ) as install:
        name, other = unique("mrk"), unique("single")
        blob = install.blob(SECRET, name)
        install.key_arn = single
        single_blob = install.blob(b"kmst-one-region", other)
        regions = Regions()
        proxy.set_fault(regions)
        try:
            proxy.reset_counts()
            assert Key.request(install.description(name), blob).read() == SECRET
            line = install.log.wait_for(name)
            assert " outcome=ok " in line and f"decrypt.{REPLICA}:" in line, line
            assert proxy.count("Decrypt") >= 2  # the dropped primary, then the replica
            (asked,) = regions.asked
            assert asked["KeyId"] == replica
            assert asked["EncryptionContext"] == {"kmskeys_name": name}
            with pytest.raises(TemporarilyUnavailableError):
                Key.request(install.description(other), single_blob)
            line = install.log.wait_for(other)
            assert " outcome=unavailable " in line and "single-Region key" in line, line
            assert f"decrypt.{REPLICA}" not in line, line
            assert len(regions.asked) == 1  # never asked the other region
        finally:
            proxy.set_fault(None)
