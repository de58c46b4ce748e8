"""scripts/fleet_sim.py: docs/scale.md is its output, and the model does what the doc says."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "scale.md"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fleet_sim", ROOT / "scripts" / "fleet_sim.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fleet_sim"] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


sim = _load()
# Small fleets keep the behavioural checks fast; the doc's tables use the full sample.
SMALL = sim.Fleet(sample_hosts=40)


def test_committed_doc_is_the_script_output_with_the_fixed_seed() -> None:
    document = DOC.read_text()
    assert sim.splice(document, sim.markdown(sim.SEED)) == document, (
        "docs/scale.md is stale: run python scripts/fleet_sim.py --write docs/scale.md"
    )


def test_check_mode_fails_on_a_stale_doc(tmp_path: Path) -> None:
    stale = tmp_path / "scale.md"
    stale.write_text(f"intro\n{sim.BEGIN}\n| old | table |\n{sim.END}\noutro\n")
    few = ["--seed", "1", "--hosts", "4"]  # a tiny sample: this checks the plumbing only
    assert sim.main(["--check", str(stale), *few]) == 1
    assert sim.main(["--write", str(stale), *few]) == 0
    assert sim.main(["--check", str(stale), *few]) == 0
    text = stale.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "| old |" not in text


def test_same_seed_same_numbers_other_seed_other_numbers() -> None:
    first = sim.simulate(SMALL, "reboot", seed=3).decrypts
    assert sim.simulate(SMALL, "reboot", seed=3).decrypts == first
    assert sim.simulate(SMALL, "reboot", seed=4).decrypts != first


def test_one_lifetime_after_a_cold_boot_host_cache_divides_decrypts_by_services() -> None:
    # Within the first lifetime every key is fetched once: exact counts, no statistics.
    fleet = replace(SMALL, horizon=SMALL.ttl * (1 - SMALL.ttl_jitter) - 2)
    keys = fleet.sample_hosts * fleet.secrets
    per_keyring = sim.simulate(replace(fleet, host_cache=False), "reboot")
    host_cache = sim.simulate(fleet, "reboot")
    assert sum(per_keyring.decrypts) == keys * fleet.services
    assert sum(host_cache.decrypts) == keys


def test_steady_state_rates_match_the_arithmetic() -> None:
    per_keyring = sim.simulate(replace(SMALL, host_cache=False), "steady")
    host_cache = sim.simulate(SMALL, "steady")
    # hosts x services x secrets / mean lifetime (ttl minus half a second of kernel rounding).
    expected = sim.SCALE_HOSTS * SMALL.services * SMALL.secrets / (SMALL.ttl - 0.5)
    assert per_keyring.mean == pytest.approx(expected, rel=0.03)
    # At most one Decrypt per host and secret per entry lifetime: services-per-host fewer, or
    # fewer still, as the entry is refreshed only by a miss after it expired.
    assert host_cache.mean * SMALL.services <= per_keyring.mean
    assert host_cache.mean * SMALL.services >= 0.75 * per_keyring.mean


def test_jitter_spreads_the_echoes_of_a_synchronized_reboot_not_the_boot() -> None:
    fleet = replace(SMALL, host_cache=False, boot_window=sim.SYNC_BOOT)
    still = sim.simulate(replace(fleet, ttl_jitter=0.0), "reboot")
    jittered = sim.simulate(fleet, "reboot")
    echo = fleet.ttl * (1 - fleet.ttl_jitter) - fleet.service_start
    # Every key is cold at boot, whatever its lifetime.
    assert jittered.peak_between(0, echo) == pytest.approx(still.peak_between(0, echo), rel=0.05)
    # Without jitter the storm comes back every ttl at full height; with it, far lower.
    assert still.peak_between(echo, fleet.horizon) >= still.peak_between(0, echo)
    assert jittered.peak_between(echo, fleet.horizon) < 0.5 * still.peak_between(echo, echo * 9)
    assert jittered.peak < still.peak


def test_prefetch_makes_the_first_app_requests_hits() -> None:
    fleet = replace(SMALL, prefetch=True, boot_window=sim.SYNC_BOOT, horizon=200.0)
    res = sim.simulate(fleet, "reboot")
    assert sum(res.decrypts) == fleet.sample_hosts * fleet.secrets
    apps_start = int((fleet.boot_window + fleet.prefetch_window) // fleet.bin_seconds)
    assert sum(res.decrypts[apps_start + 1 :]) == 0  # the apps' requests were all hits
    # Spread over the prefetch jitter, the boot peak is lower than the apps' own cold start.
    cold = sim.simulate(replace(fleet, prefetch=False), "reboot")
    assert res.peak < cold.peak


def test_rolling_deploy_costs_decrypts_only_without_the_host_cache() -> None:
    per_keyring = replace(SMALL, host_cache=False)
    steady = sim.simulate(per_keyring, "steady")
    deploy = sim.simulate(per_keyring, "deploy")
    restarted = SMALL.sample_hosts * SMALL.services * SMALL.secrets
    # A restart fetches every key again, half a lifetime early on average: over the hour that
    # is half an extra Decrypt per key.
    assert sum(deploy.decrypts) - sum(steady.decrypts) == pytest.approx(restarted / 2, rel=0.1)
    with_cache = sim.simulate(SMALL, "deploy")
    assert sum(with_cache.decrypts) <= 1.1 * sum(sim.simulate(SMALL, "steady").decrypts)


def test_outage_stale_on_error_keeps_secrets_available_within_its_grace() -> None:
    pairs = SMALL.sample_hosts * SMALL.services * SMALL.secrets
    outage = SMALL.outage_seconds

    def lost(fleet: object) -> float:
        res = sim.simulate(fleet, "outage")
        return float(res.unavailable / (pairs * outage))

    none = lost(replace(SMALL, host_cache=False))
    no_stale = lost(SMALL)
    short = lost(replace(SMALL, stale_grace=outage / 2))
    long = lost(replace(SMALL, stale_grace=outage + 2 * SMALL.ttl))
    assert none > 0.85  # nearly everything expires within one ttl of a 30-minute outage
    assert no_stale < none  # the host cache's fresh entries only delay it
    assert long == 0.0
    assert long < short < no_stale
    res = sim.simulate(replace(SMALL, stale_grace=outage + 2 * SMALL.ttl), "outage")
    assert res.stale_served > 0
    # Every stale key's expiry tries KMS: about services x secrets / stale_ttl per host.
    attempts = res.attempts_down / outage
    expected = SMALL.sample_hosts * SMALL.services * SMALL.secrets / SMALL.stale_ttl
    assert attempts == pytest.approx(expected, rel=0.2)


def test_hosts_at_quota_scales_linearly() -> None:
    assert sim.hosts_at(10_000, 1_000.0) == "10,000"
    assert sim.hosts_at(20_000, 1_000.0) == "20,000"
    assert sim.hosts_at(10_000, 3_000.0) == "3,300"
    assert sim.hosts_at(10_000, 0.0) == "never"


def test_doc_cites_the_aws_quota_page_with_its_figures() -> None:
    document = DOC.read_text()
    assert "https://docs.aws.amazon.com/kms/latest/developerguide/requests-per-second.html" in (
        document
    )
    for figure, _regions in sim.QUOTAS:
        assert f"{figure:,}" in document


def test_jitter_spreads_the_echoes_of_the_recovery_after_an_outage() -> None:
    fleet = replace(SMALL, host_cache=False)
    recovered = fleet.outage_start + fleet.outage_seconds
    echo = recovered + fleet.ttl * (1 - fleet.ttl_jitter) - fleet.retry
    still = sim.simulate(replace(fleet, ttl_jitter=0.0), "outage")
    jittered = sim.simulate(fleet, "outage")
    # Both recover in one retry interval: every key at once ...
    for res in (still, jittered):
        assert res.peak_between(recovered, echo) == pytest.approx(
            sim.SCALE_HOSTS * fleet.services * fleet.secrets / fleet.retry, rel=0.05
        )
    # ... and only jitter keeps that wave from coming back every ttl.
    assert jittered.peak_between(echo, fleet.horizon) < 0.5 * still.peak_between(
        echo, fleet.horizon
    )


# --- the rotation case (scripts/fleet_rotation.py) -------------------------------------------

rotation = sys.modules["fleet_rotation"]  # imported by fleet_sim
Rotation = rotation.Rotation


def test_with_the_host_cache_a_rotation_costs_one_call_per_host() -> None:
    # The fleet row: 100 hosts x 5 uids.
    fleet = Rotation(hosts=100, uids=5)
    assert len(rotation.simulate(fleet, seed=1).calls) == 100
    assert len(rotation.simulate(replace(fleet, host_cache=False), seed=1).calls) == 500
    # Whatever the fan-out: the host cache, not the rate control, sets the count.
    for fanned in (replace(fleet, concurrency=7), replace(fleet, jitter=20.0)):
        assert len(rotation.simulate(fanned, seed=1).calls) == 100


def test_the_bounded_lock_lets_waiters_call_when_a_call_outlasts_it() -> None:
    # A GetSecretValue slower than the lock's 1 s: a uid that gave up waiting calls itself.
    slow = Rotation(hosts=50, uids=5, call_seconds=1.5)
    assert len(rotation.simulate(slow, seed=1).calls) > 50


def test_a_count_caps_the_peak_whatever_the_fleet_a_percentage_grows_with_it() -> None:
    capped = [rotation.simulate(Rotation(hosts=n, concurrency=20), seed=2) for n in (1000, 4000)]
    assert capped[1].peak <= 1.3 * capped[0].peak
    assert capped[0].peak < sim_quota("PARAMETER_STORE_TPS")
    # ... and the fleet takes proportionally longer.
    assert capped[1].done == pytest.approx(4 * capped[0].done, rel=0.15)
    share = [rotation.simulate(Rotation(hosts=n, concurrency_pct=10), seed=2) for n in (1000, 4000)]
    assert share[1].peak == pytest.approx(4 * share[0].peak, rel=0.25)
    at_once = [rotation.simulate(Rotation(hosts=n), seed=2) for n in (1000, 4000)]
    assert at_once[1].peak == pytest.approx(4 * at_once[0].peak, rel=0.2)
    assert at_once[0].done < 5 < capped[0].done


def test_sends_default_rate_control_sits_at_parameter_store_s_default() -> None:
    default = Rotation(hosts=2000, concurrency=rotation.SEND_COMMAND_DEFAULT_CONCURRENCY)
    peak = rotation.simulate(default, seed=3).peak
    assert 0.8 * sim_quota("PARAMETER_STORE_TPS") <= peak <= 1.3 * sim_quota("PARAMETER_STORE_TPS")


def test_jitter_spreads_the_flushes_over_its_window() -> None:
    fleet = Rotation(hosts=3000)
    still = rotation.simulate(fleet, seed=4)
    spread = rotation.simulate(replace(fleet, jitter=30.0), seed=4)
    assert spread.peak < still.peak / 5
    assert spread.peak == pytest.approx(3000 / 30, rel=0.35)
    assert 30 <= spread.done < 35


def test_without_an_event_the_new_value_takes_up_to_two_ttls_and_no_extra_call() -> None:
    fleet = Rotation(hosts=500, flush=False)
    out = rotation.simulate(fleet, seed=5)
    assert len(out.calls) == 500
    longest = fleet.ttl * (1 + fleet.ttl_jitter)
    assert fleet.ttl < out.done <= 2 * longest + fleet.call_seconds


def test_hosts_at_quota_is_never_under_a_low_cap() -> None:
    assert rotation.hosts_at(40, Rotation(hosts=1000, concurrency=20), seed=6) == "never"
    assert rotation.hosts_at(10_000, Rotation(hosts=1000, concurrency=50), seed=6) == "never"
    reach = rotation.hosts_at(40, Rotation(hosts=1000), seed=6)
    assert 30 <= int(reach.replace(",", "")) <= 100


def test_same_seed_same_rotation_other_seed_other_timing() -> None:
    fleet = Rotation(hosts=200, concurrency=10)
    assert rotation.simulate(fleet, seed=7).calls == rotation.simulate(fleet, seed=7).calls
    assert rotation.simulate(fleet, seed=7).calls != rotation.simulate(fleet, seed=8).calls


def test_doc_cites_the_rotation_quotas_with_their_figures() -> None:
    document = DOC.read_text()
    for url in (
        "https://docs.aws.amazon.com/secretsmanager/latest/userguide/reference_limits.html",
        "https://docs.aws.amazon.com/systems-manager/latest/userguide/parameter-store-throughput.html",
    ):
        assert url in document
    assert f"{rotation.SECRETS_MANAGER_TPS:,} per second" in document
    assert f"{rotation.PARAMETER_STORE_TPS} per second" in document
    assert "100 GetSecretValue calls, not 500" in document


def sim_quota(name: str) -> int:
    return int(getattr(rotation, name))
