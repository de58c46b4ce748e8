"""`kmskeys-resolver prefetch [NAME...]`: fill the host cache, e.g. at boot.

By default: every blob in blob_dir, and every secret and parameter the `sm:` and `ssm:`
allowlists name exactly (a full name or an ARN; a pattern names none: listing secrets needs a
permission the hosts do not have, and should not). A NAME given is a `kms:` name, or a whole
description (`sm:prod/db`). Each goes through its backend exactly as a request would (checks,
host cache, the AWS call), as root, spending a budget of its own (never uid 0's bucket: a root
service's next miss must not find it spent); a fresh entry is left alone. A secret's entry
serves every field of it, so `sm:NAME` fills what `sm:NAME#FIELD` reads. User-bound blobs are
skipped: KMS binds them to the user who asks, and there is none yet. Concurrency is bounded,
and every name waits a random moment first, so that a fleet booting together does not call
AWS in one burst.
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
from resolver.backend import Context, Request, Result
from resolver.blobs import BlobBackend
from resolver.config import Config
from resolver.errors import RefusedError, ResolverError
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


def source_names(config: Config) -> list[str]:
    """`sm:NAME` and `ssm:NAME` for each secret and parameter the allowlists name exactly."""
    from resolver import spec_sm, spec_ssm
    from resolver.sourcename import WILDCARDS, arn_of

    found = []
    for items, service, path, prefix in (
        (config.sm_secrets, spec_sm.SERVICE, config.sm_path_prefix, config.sm_prefix),
        (config.ssm_parameters, spec_ssm.SERVICE, config.ssm_path_prefix, config.ssm_prefix),
    ):
        for item in items:
            arn = arn_of(item, service)
            name = arn.name if arn is not None else item
            if service == spec_ssm.SERVICE:
                name = name.lstrip("/")
            if not WILDCARDS & set(name) and name.startswith(path):
                found.append(f"{prefix}:{name[len(path) :]}")
    return sorted(dict.fromkeys(found))


def prefetch_one(config: Config, name: str, jitter: float) -> str:
    """Fill the host-cache entry of NAME (or of a description); what happened, in words
    (never a payload)."""
    time.sleep(random.uniform(0.0, jitter))  # noqa: S311 (spreading load, not a secret)
    context = Context(time.monotonic() + config.deadline, PrefetchBudget(config))
    name = name.removeprefix(f"{config.prefix}:")  # a kms: description is its NAME
    try:
        if ":" in name:
            result = _prefetch_source(config, name, context)
        else:
            backend = BlobBackend(config)
            request = Request(prefix=config.prefix, name=name, uid=0, gid=0, user="root")
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


def _prefetch_source(config: Config, desc: str, context: Context) -> Result:
    """A whole description through its backend, as root would ask for it."""
    from resolver.registry import backend_for, split_description

    try:
        prefix, name, qualifier = split_description(config, desc)
    except InvalidNameError as exc:
        raise RefusedError(str(exc)) from None
    request = Request(prefix, name, 0, 0, "root", b"", qualifier)
    return backend_for(config, prefix).resolve(request, context)


def prefetch(
    config: Config,
    names: Sequence[str] = (),
    concurrency: int = DEFAULT_CONCURRENCY,
    jitter: float = DEFAULT_JITTER,
) -> list[tuple[str, str]]:
    """(NAME, outcome) for each of `names` (default: every blob in blob_dir, then the
    secrets and parameters the allowlists name exactly)."""
    chosen = list(names) or [*blob_names(config.blob_dir), *source_names(config)]
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, MAX_CONCURRENCY))) as pool:
        outcomes = list(pool.map(lambda n: prefetch_one(config, n, jitter), chosen))
    return list(zip(chosen, outcomes, strict=True))
