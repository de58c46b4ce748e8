"""`kmskeys-resolver prefetch [NAME...]`: fill the host cache from blob_dir, e.g. at boot.

Each blob goes through the `kms:` backend exactly as a request would (checks, host cache,
KMS), as root, spending a budget of its own (never uid 0's bucket: a root service's next miss
must not find it spent); a fresh entry is left alone. User-bound blobs are skipped: KMS binds
them to the user who asks, and there is none yet. Concurrency is bounded, and every name waits
a random moment first, so that a fleet booting together does not call KMS in one burst.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kmskeys.contract import BLOB_SUFFIX
from kmskeys.errors import InvalidNameError
from kmskeys.names import validate_name
from resolver.backend import Context, Request
from resolver.blobs import BlobBackend
from resolver.config import Config
from resolver.errors import ResolverError
from resolver.limits import PrefetchBudget

DEFAULT_CONCURRENCY = 4
DEFAULT_JITTER = 5.0
MAX_CONCURRENCY = 64


def blob_names(blob_dir: Path) -> Iterator[str]:
    """The names of the blobs below blob_dir (NAME.kms, NAME may hold '/'), sorted."""
    found = []
    for top, dirs, files in os.walk(blob_dir):  # never follows symlinked directories
        dirs.sort()
        for file in files:
            if not file.endswith(BLOB_SUFFIX):
                continue
            relative = os.path.relpath(os.path.join(top, file), blob_dir)[: -len(BLOB_SUFFIX)]
            try:
                found.append(validate_name(relative))
            except InvalidNameError:
                continue  # a request could never name it either
    yield from sorted(found)


def prefetch_one(config: Config, name: str, jitter: float) -> str:
    """Fill the host-cache entry of NAME; what happened, in words (never a payload)."""
    time.sleep(random.uniform(0.0, jitter))  # noqa: S311 (spreading load, not a secret)
    backend = BlobBackend(config)
    request = Request(prefix=config.prefix, name=name, uid=0, gid=0, user="root")
    context = Context(time.monotonic() + config.deadline, PrefetchBudget(config))
    try:
        _, blob = backend.load(request, context.notes)
        if blob.binds_user:
            return "skipped (user-bound: decrypted for its user on request)"
        if blob.binds_unit:
            return "skipped (unit-bound: decrypted for its unit on request)"
        result = backend.resolve(request, context)
    except ResolverError as exc:
        return f"failed ({exc.outcome}): {exc.reason}"
    if result.stale:
        return f"failed (unavailable): {result.details.get('reason')}; the older entry is kept"
    if result.details.get("source") == "hostcache":
        return "already cached"
    return "cached"


def prefetch(
    config: Config,
    names: Sequence[str] = (),
    concurrency: int = DEFAULT_CONCURRENCY,
    jitter: float = DEFAULT_JITTER,
) -> list[tuple[str, str]]:
    """(NAME, outcome) for each of `names` (default: every blob in blob_dir)."""
    chosen = list(names) or list(blob_names(config.blob_dir))
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, MAX_CONCURRENCY))) as pool:
        outcomes = list(pool.map(lambda n: prefetch_one(config, n, jitter), chosen))
    return list(zip(chosen, outcomes, strict=True))
