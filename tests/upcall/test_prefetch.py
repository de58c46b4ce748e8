"""`kmskeys-resolver prefetch` fills the host cache from blob_dir: the first request is a hit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kmskeys import Key
from tests.support.names import unique
from tests.upcall.harness import run_resolver

pytestmark = pytest.mark.upcall


def test_prefetch_fills_the_host_cache_and_skips_user_bound_blobs(extra_install: Any) -> None:
    with extra_install() as install:  # a blob_dir of its own: prefetch walks all of it
        shared, nested, bound = unique("pre"), f"app/{unique('pre')}", unique("prebound")
        for name in (shared, nested):
            install.deploy(name, install.blob(f"kmst-{name}".encode(), name))
        # Bound to another user than the root prefetch runs as: skipped, not refused.
        install.deploy(bound, install.blob(b"kmst-bound", bound, user="nobody"))
        install.proxy.reset_counts()
        args = ("prefetch", "--config", str(install.config), "--concurrency", "2")
        done = run_resolver(*args, "--jitter", "0.2")
        assert done.returncode == 0, done.stderr
        assert sorted(done.stdout.splitlines()) == sorted(
            [
                f"{shared}: cached",
                f"{nested}: cached",
                f"{bound}: skipped (user-bound: decrypted for its user on request)",
            ]
        )
        assert f"kmst-{shared}" not in done.stdout  # no payload printed
        assert install.decrypts() == 2
        # The first app request after the prefetch: answered by the host cache, no KMS call.
        for name in (shared, nested):
            assert Key.request(install.description(name), b"").read() == f"kmst-{name}".encode()
            assert " source=hostcache " in install.log.wait_for(name)
        assert install.decrypts() == 2
        # Again, for one name: it is fresh, so nothing is decrypted.
        again = run_resolver(*args, "--jitter", "0", shared)
        assert (again.returncode, again.stdout) == (0, f"{shared}: already cached\n")
        assert install.decrypts() == 2


def test_the_prefetch_unit_runs_once_at_boot_without_core_dumps() -> None:
    unit = Path(__file__).resolve().parents[2] / "resolver" / "data" / "kmskeys-prefetch.service"
    text = unit.read_text()
    for line in ("Type=oneshot", "LimitCORE=0", "WantedBy=multi-user.target"):
        assert f"\n{line}\n" in text, line
    assert "\nExecStart=kmskeys-resolver prefetch --config /etc/kmskeys/resolver.toml " in text


def test_prefetch_spends_a_budget_of_its_own_never_uid_0s(extra_install: Any) -> None:
    # Two tokens per bucket, refilled once in ~17 min: a prefetch of two blobs empties a
    # bucket. It must be prefetch's own: root's next miss still finds uid 0's bucket full.
    with extra_install(kms_rate_per_uid=0.001, kms_burst_per_uid=2) as install:
        names = [unique("budget") for _ in range(3)]
        for name in names:
            install.deploy(name, install.blob(f"kmst-{name}".encode(), name))
        install.proxy.reset_counts()
        args = ("prefetch", "--config", str(install.config), "--jitter", "0")
        done = run_resolver(*args, *names[:2])
        assert done.returncode == 0, done.stdout + done.stderr
        assert install.decrypts() == 2
        # Root's miss of a name nothing cached: its own bucket, untouched by the prefetch.
        root_name = unique("budgetroot")
        text = install.blob(b"kmst-root-miss", root_name)
        assert install.get(root_name, text) == b"kmst-root-miss"
        assert install.decrypts() == 3
        # Prefetch's bucket is empty: its next name waits for a refill, no KMS call.
        again = run_resolver(*args, names[2])
        assert again.returncode == 1
        assert again.stdout.startswith(f"{names[2]}: failed (unavailable): prefetch is over its")
        assert install.decrypts() == 3
