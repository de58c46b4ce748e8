"""Unit-bound blobs (issue 24): the binds-unit flag, the recorded unit, and the context KMS
binds to the unit the resolver reads from the requester's cgroup."""

from __future__ import annotations

import struct

import pytest

from kmskeys.blob import (
    CONTEXT_NAME,
    CONTEXT_UNIT,
    CONTEXT_USER,
    BlobFormatError,
    BlobMismatchError,
    envelope_aad,
    parse_blob,
)
from tests.blob.test_blob_format import ARN, body_text, direct, envelope

pytestmark = pytest.mark.unit


def unit_body(unit: bytes = b"nginx.service", user: bytes | None = None) -> bytes:
    """A version-2 body bound to a unit (and a user), laid out as docs/blob-format.md says:
    the flags (bit 1: binds unit), the name, the user if bound, then the unit."""
    flags = 0x02 | (0 if user is None else 0x01)
    out = struct.pack(">BBB", 1, flags, 2) + b"db"
    if user is not None:
        out += struct.pack(">B", len(user)) + user
    out += struct.pack(">B", len(unit)) + unit
    arn = ARN.encode()
    return out + struct.pack(">H", len(arn)) + arn + b"\x00" + struct.pack(">H", 4) + b"ctxt"


def test_documented_layout_of_a_unit_bound_blob() -> None:
    blob = parse_blob(body_text(unit_body(user=b"www-data"), version=2))
    assert (blob.binds_unit, blob.unit, blob.binds_user, blob.user) == (
        True,
        "nginx.service",
        True,
        "www-data",
    )
    assert blob.to_text() == body_text(unit_body(user=b"www-data"), version=2)
    made = direct(binds_unit=True, unit="nginx.service")
    assert parse_blob(made.to_text()) == made


def test_the_context_binds_the_unit_the_request_supplies() -> None:
    blob = direct(binds_unit=True, unit="nginx.service", binds_user=True, user="www-data")
    assert blob.encryption_context("db", "www-data", "nginx.service") == {
        CONTEXT_NAME: "db",
        CONTEXT_USER: "www-data",
        CONTEXT_UNIT: "nginx.service",
    }
    with pytest.raises(BlobFormatError, match="bound to a unit but the request supplied none"):
        blob.encryption_context("db", "www-data")
    unbound = direct()
    assert CONTEXT_UNIT not in unbound.encryption_context("db", None, "nginx.service")


def test_a_blob_for_another_unit_is_refused_locally_with_both_units() -> None:
    blob = direct(binds_unit=True, unit="nginx.service")
    with pytest.raises(BlobMismatchError) as caught:
        blob.check_request("db", None, "cron.service")
    assert caught.value.reason == "blob was encrypted for unit 'nginx.service', not 'cron.service'"
    blob.check_request("db", None, "nginx.service")
    blob.check_request("db", None, None)  # not asked: the binding (KMS) decides


def test_the_version_1_form_keeps_the_binding_and_drops_the_record() -> None:
    """Stripping the record leaves KMS's refusal: the flag stays, so the resolver still
    supplies the unit, and the host cache shares one entry between both forms."""
    blob = direct(binds_unit=True, unit="nginx.service")
    v1 = parse_blob(blob.identity())
    assert (v1.version, v1.binds_unit, v1.unit) == (1, True, None)
    assert v1.identity() == blob.identity()
    assert v1.encryption_context("db", None, "cron.service")[CONTEXT_UNIT] == "cron.service"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (unit_body(unit=b""), "a unit name is 1 to 255"),
        (unit_body(unit=b"nginx"), "ending in .service"),
        (unit_body(unit=b"system.slice"), "ending in .service"),
        (unit_body(unit=b"a b.service"), "a unit name"),
        (unit_body(unit=b"\xe9.service"), "recorded unit is not ASCII"),
        (unit_body()[:-60], "truncated"),
    ],
)
def test_a_malformed_recorded_unit_gives_one_reason(body: bytes, reason: str) -> None:
    with pytest.raises(BlobFormatError, match=reason):
        parse_blob(body_text(body, version=2))


def test_the_unit_is_never_metadata() -> None:
    """The request supplies it: a blob that carries it is forged or broken."""
    key = CONTEXT_UNIT.encode()
    arn = ARN.encode()
    body = struct.pack(">BBH", 1, 0, len(arn)) + arn + b"\x01"
    body += struct.pack(">B", len(key)) + key + struct.pack(">H", 5) + b"x.svc"
    body += struct.pack(">H", 4) + b"ctxt"
    with pytest.raises(BlobFormatError, match="request-bound context key 'kmskeys_unit'"):
        parse_blob(body_text(body))
    with pytest.raises(BlobFormatError, match="reserved"):
        direct(metadata={CONTEXT_UNIT: "nginx.service"})


def test_an_envelope_seal_binds_the_unit_flag() -> None:
    bound = envelope(binds_unit=True, unit="nginx.service")
    context = bound.encryption_context("db", None, "nginx.service")
    unflagged = envelope()
    assert envelope_aad(bound, context) != envelope_aad(unflagged, context)


def test_a_unit_record_without_the_flag_and_the_reverse_refuse() -> None:
    with pytest.raises(BlobFormatError, match="binds no unit records none"):
        direct(unit="nginx.service")
    with pytest.raises(BlobFormatError, match="bound to a unit records that unit"):
        direct(binds_unit=True)
    with pytest.raises(BlobFormatError, match="legacy blob"):
        direct(version=0, mode="legacy", key_arn=None, name=None, binds_unit=True)


def test_the_host_cache_keys_a_unit_bound_blob_by_its_unit() -> None:
    """Two units allowed one name share no host-cache entry for a blob bound to one of them:
    the entry of the other unit's request could otherwise answer without KMS's check."""
    from kmskeys.contract import hostcache_entry

    digest = "ab" * 32
    one = hostcache_entry("kms", "db", None, digest, "nginx.service")
    assert one == f"kmskeys-hc:kms:db:{digest}:s=nginx.service"
    assert one != hostcache_entry("kms", "db", None, digest, "cron.service")
    assert one != hostcache_entry("kms", "db", None, digest)
    both = hostcache_entry("kms", "db", "www-data", digest, "nginx.service")
    assert both.endswith(":u=www-data:s=nginx.service")
    assert one.startswith(hostcache_entry("kms", "db"))  # what flush matches
