"""Fresh-process row: time to the secret in a new Python process, kmskeys vs boto3.

kmskeys gets a key the resolver has already cached (the steady state of a host); boto3 must
import, build a client and call Decrypt against the same emulator in every process, because a
process has nowhere to keep the plaintext. The budget (docs/design.md) is on the total time per
process, which is what a user waits for; the run's shared `python -c pass` baseline is shown
beside it, with its spread, as the floor both stand on.
"""

from __future__ import annotations

from tests.bench.cgi import BOTO3_DECRYPT, NAME, stack
from tests.bench.common import BenchContext, Row, median, percentile, row, time_process

RUNS = 15
BUDGET = 20.0


def _shown(samples: list[float]) -> str:
    low, high = percentile(samples, 10) * 1000, percentile(samples, 90) * 1000
    return f"{median(samples) * 1000:.1f} ms (p10-p90 {low:.1f}-{high:.1f})"


def rows(ctx: BenchContext) -> list[Row]:
    """Interleaved runs of both, on the CGI rows' emulator and resolver set-up."""
    bare = ctx.bare()
    with stack(ctx) as st:
        env = st.env()
        get = f"import kmskeys; kmskeys.get_secret({NAME!r}, prefix={st.install.prefix!r})"
        # The boto3 CGI's decrypt without its page: the least a process can do for the secret.
        boto3_get = f"here = {str(st.docroot)!r}\n" + BOTO3_DECRYPT
        boto3_argv = [ctx.python, "-c", boto3_get]
        time_process([ctx.python, "-c", get], env=env)  # the one miss: resolve and cache
        kms, boto = [], []
        for _ in range(RUNS):
            kms.append(time_process([ctx.python, "-c", get], env=env))
            boto.append(time_process(boto3_argv, env=env))
    ratio = median(boto) / median(kms)
    return [
        row(
            "fresh process time-to-secret vs boto3 decrypt (total time per process)",
            value=_shown(kms),
            baseline=f"boto3 {_shown(boto)}; floor {bare.describe()}",
            ratio=f"{ratio:.1f}x faster",
            budget=f"≥ {BUDGET:.0f}x",
            ok=ratio >= BUDGET,
        )
    ]
