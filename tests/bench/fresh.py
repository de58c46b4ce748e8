"""Fresh-process row: time to the secret in a new Python process, kmskeys vs boto3 vs nothing.

kmskeys gets a key the resolver has already cached (the steady state of a host); boto3 must
import, build a client and call Decrypt against the same emulator in every process, because a
process has nowhere to keep the plaintext. The budget is judged on the time each approach adds
to a bare `python -c pass` (what the library controls); the total times are shown beside it.
"""

from __future__ import annotations

from tests.bench.cgi import BOTO3_DECRYPT, NAME, stack
from tests.bench.common import BenchContext, Row, median, row, time_process

RUNS = 15
BUDGET = 25.0


def rows(ctx: BenchContext) -> list[Row]:
    """Interleaved runs of the three, on the CGI rows' emulator and resolver set-up."""
    with stack(ctx) as st:
        env = st.env()
        get = f"import kmskeys; kmskeys.get_secret({NAME!r}, prefix={st.install.prefix!r})"
        # The boto3 CGI's decrypt without its page: the least a process can do for the secret.
        boto3_get = f"here = {str(st.docroot)!r}\n" + BOTO3_DECRYPT
        boto3_argv = [ctx.python, "-c", boto3_get]
        time_process([ctx.python, "-c", get], env=env)  # the one miss: resolve and cache
        bare, kms, boto = [], [], []
        for _ in range(RUNS):
            bare.append(time_process([ctx.python, "-c", "pass"], env=env))
            kms.append(time_process([ctx.python, "-c", get], env=env))
            boto.append(time_process(boto3_argv, env=env))
    b, k, o = median(bare) * 1000, median(kms) * 1000, median(boto) * 1000
    added_k, added_o = k - b, o - b
    ratio = added_o / max(added_k, 0.1)
    return [
        row(
            "fresh process time-to-secret vs boto3 decrypt (time above python -c pass)",
            value=f"{k:.1f} ms (+{added_k:.1f} ms)",
            baseline=f"boto3 {o:.0f} ms (+{added_o:.0f} ms); python -c pass {b:.1f} ms",
            ratio=f"{ratio:.0f}x above bare ({o / k:.1f}x total)",
            budget=f"≥ {BUDGET:.0f}x",
            ok=ratio >= BUDGET,
        )
    ]
