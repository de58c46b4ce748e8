"""The settings this issue adds: host cache, stale serving, ttl jitter, and the region plan."""

from __future__ import annotations

import pytest

from resolver.config import Config, parse
from resolver.errors import ConfigError
from resolver.kms import in_region, is_multi_region, region_plan
from resolver.pipeline import spread

pytestmark = pytest.mark.unit

MRK = "arn:aws:kms:us-east-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab"
SINGLE = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def test_defaults_and_valid_values() -> None:
    config = Config()
    assert (config.host_cache, config.stale_grace, config.stale_ttl, config.ttl_jitter) == (
        True,
        3600,
        30,
        0.1,
    )
    parsed = parse({"host_cache": False, "stale_grace": 0, "stale_ttl": 5, "ttl_jitter": 0})
    assert (parsed.host_cache, parsed.stale_grace, parsed.stale_ttl, parsed.ttl_jitter) == (
        False,
        0,
        5,
        0.0,
    )


@pytest.mark.parametrize(
    "setting",
    [
        {"host_cache": "yes"},
        {"stale_grace": -1},
        {"stale_grace": 1.5},
        {"stale_ttl": 0},
        {"stale_ttl": True},
        {"ttl_jitter": 0.6},
        {"ttl_jitter": -0.1},
        {"ttl_jitter": "10%"},
        {"host_cache_ttl": 3},
    ],
    ids=str,
)
def test_bad_values_and_unknown_keys_are_refused(setting: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        parse(setting)


def test_spread_stays_within_the_jitter_and_uses_all_of_it() -> None:
    draws = [spread(300, 0.1) for _ in range(2000)]
    assert 270 <= min(draws) < 280 and 320 < max(draws) <= 330
    assert spread(300, 0.0) == 300


def test_whole_seconds_leave_small_ttls_unspread() -> None:
    # 3 s +- 10 % is 2.7..3.3 s, and the kernel keeps whole seconds: always 3.
    assert {spread(3, 0.1) for _ in range(500)} == {3}
    assert {spread(1, 0.5) for _ in range(500)} <= {1, 2}


def test_a_multi_region_key_falls_back_to_configured_regions_only() -> None:
    config = parse({"regions": ["us-east-1", "eu-west-1"], "key_arns": [MRK]})
    assert is_multi_region(MRK) and not is_multi_region(SINGLE)
    plan, why = region_plan(config, MRK, "us-east-1")
    assert plan == [(MRK, "us-east-1"), (in_region(MRK, "eu-west-1"), "eu-west-1")]
    assert in_region(MRK, "eu-west-1").split(":")[3] == "eu-west-1" and why == ""


def test_a_single_region_key_gets_no_fallback_and_says_why() -> None:
    config = parse({"regions": ["us-east-1", "eu-west-1"], "key_arns": [SINGLE]})
    plan, why = region_plan(config, SINGLE, "us-east-1")
    assert plan == [(SINGLE, "us-east-1")]
    assert "single-Region key" in why
    alone = parse({"regions": ["us-east-1"], "key_arns": [MRK]})
    assert region_plan(alone, MRK, "us-east-1") == ([(MRK, "us-east-1")], "")


def test_an_admin_group_with_members_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # The group's entry as NSS would return it; changing the real group would affect every
    # resolver on the host while the test runs.
    import grp

    from resolver import install, pipeline
    from resolver.errors import InstallError

    def group(members: list[str]) -> object:
        return lambda name: grp.struct_group(("kmskeys-admin", "x", 4242, members))

    monkeypatch.setattr(grp, "getgrnam", group([]))
    assert pipeline.admin_group() == 4242
    install.ensure_admin_group(actions := [])
    assert actions == []  # exists, empty: nothing to do
    monkeypatch.setattr(grp, "getgrnam", group(["mallory"]))
    assert pipeline.admin_group() is None  # the key keeps %g and gets no group bits
    with pytest.raises(InstallError, match="has members"):
        install.ensure_admin_group([])
