"""The `kms:` backend: NAME's blob (inline, or NAME.kms in blob_dir), decrypted by KMS.

The blob comes from the callout or from a root-owned file below blob_dir; the values KMS binds
it to (name, user) come from the request. Decryption goes through the warm daemon when one is
configured and answering, else through a KMS client built in this process (resolver/kms.py).
Between the checks and KMS sits the host cache (resolver/hostcache.py): one Decrypt per host for
each blob, whatever keyring or uid asks, and a stale answer when KMS is unavailable.
"""

from __future__ import annotations

import time

from kmskeys.blob import MAX_BLOB_CHARS, Blob, BlobFormatError, parse_blob
from kmskeys.contract import BLOB_SUFFIX, hostcache_entry
from resolver.backend import BlobDecrypter, Request, Trace
from resolver.config import Config
from resolver.errors import DeadlineExceeded, KmsUnavailableError, RefusedError
from resolver.hostcache import Entry, HostCache, blob_digest
from resolver.policy import check_blob, check_key
from resolver.safefile import read_below


class BlobBackend:
    """Loads, checks and decrypts the blob for one request."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def resolve(self, request: Request, deadline: float, trace: Trace) -> bytes:
        """The plaintext of NAME's blob for this request."""
        _, blob = self.load(request, trace)
        if not self.config.host_cache:
            return self._checked_decrypt(blob, request, deadline, trace)
        # Only an identical request hits: same prefix and name, same user for a user-bound blob
        # (KMS binds it to that user), same blob: its canonical text, whatever the spelling.
        desc = hostcache_entry(
            request.prefix,
            request.name,
            request.user if blob.binds_user else None,
            blob_digest(blob.identity().encode("ascii")),
        )
        cache = HostCache()
        try:
            # Every check comes before the cache is consulted, exactly as before a KMS call:
            # the cache must never be a way around one. A refusal also drops the entry.
            self._check(blob, request)
        except RefusedError:
            cache.purge(desc)
            raise
        ttl = self.config.ttl_for(request.name, request.prefix)
        start = time.perf_counter()
        entry = cache.lookup(desc)
        trace.timings.add("hostcache", (time.perf_counter() - start) * 1000)
        if entry is None or entry.age >= ttl:
            try:
                # Refreshes of this entry by other keyrings' handlers wait here (up to
                # hostcache.REFRESH_WAIT), then find it fresh.
                with cache.refreshing(self.config.state_dir, desc):
                    entry = cache.lookup(desc)
                    if entry is None or entry.age >= ttl:
                        return self._refresh(
                            cache,
                            desc,
                            entry,
                            blob,
                            request,
                            deadline=deadline,
                            trace=trace,
                            ttl=ttl,
                        )
            except DeadlineExceeded:
                # The handler refreshing it hung on KMS past our deadline: KMS is unavailable.
                if not self._stale(entry, trace, "deadline exceeded"):
                    raise
                assert entry is not None
                return entry.plaintext
        trace.details["source"] = "hostcache"
        trace.details["age"] = f"{entry.age:.0f}"
        return entry.plaintext

    def _refresh(
        self,
        cache: HostCache,
        desc: str,
        entry: Entry | None,
        blob: Blob,
        request: Request,
        *,
        deadline: float,
        trace: Trace,
        ttl: int,
    ) -> bytes:
        config = self.config
        try:
            plaintext = self.decrypter().decrypt(blob, request, deadline, trace.timings)
        except (KmsUnavailableError, DeadlineExceeded) as exc:
            # KMS is unavailable (never a refusal, never a uid over its own KMS rate).
            why = "deadline exceeded" if isinstance(exc, DeadlineExceeded) else exc.reason
            if not self._stale(entry, trace, why):
                raise
            assert entry is not None
            return entry.plaintext
        except RefusedError:
            # A refusal is never masked: a revoked permission takes effect at this refresh.
            cache.purge(desc)
            raise
        # Kept for stale answers past its freshness; the kernel drops it after that.
        cache.store(desc, plaintext, max(ttl, config.stale_grace) + 1)
        return plaintext

    def _stale(self, entry: Entry | None, trace: Trace, why: str) -> bool:
        """True (and the trace says so) if `entry` may answer while KMS is unavailable: within
        stale_grace, with stale_ttl as the key's timeout so that KMS is asked again soon."""
        grace = self.config.stale_grace
        if entry is None or not grace or entry.age > grace:
            return False
        trace.details["source"] = "hostcache"
        trace.details["age"] = f"{entry.age:.0f}"
        trace.details["reason"] = why
        trace.stale_ttl = self.config.stale_ttl
        return True

    def _check(self, blob: Blob, request: Request) -> None:
        try:
            # A blob made for another user (its name was checked on load), before the host
            # cache and KMS; not on load, where prefetch reads user-bound blobs to skip them.
            blob.check_request(request.name, request.user)
        except BlobFormatError as exc:
            raise RefusedError(exc.reason) from None
        check_blob(blob, request.user)
        # Cheap refusals come first: a key or region the config does not list never reaches
        # the daemon or a KMS client (and never makes this process import botocore).
        check_key(self.config, blob)

    def _checked_decrypt(
        self, blob: Blob, request: Request, deadline: float, trace: Trace
    ) -> bytes:
        self._check(blob, request)
        return self.decrypter().decrypt(blob, request, deadline, trace.timings)

    def load(self, request: Request, trace: Trace) -> tuple[bytes, Blob]:
        """The request's blob text and blob: inline in the callout, else blob_dir/NAME.kms."""
        source = "inline" if request.callout else "blob_dir"
        trace.details["source"] = source
        if request.callout:
            text = request.callout
        else:
            # Names were validated by the handler (no '..', no empty segment); read_below also
            # refuses symlinks, FIFOs and files that are not root-owned at every step.
            text = read_below(
                self.config.blob_dir, request.name + BLOB_SUFFIX, MAX_BLOB_CHARS + 2, "blob"
            )
        try:
            blob = parse_blob(text, allow_legacy=self.config.allow_legacy_blobs)
            # A blob made for another name is refused here, without KMS (issue 26).
            blob.check_request(request.name, None)
        except BlobFormatError as exc:
            raise RefusedError(f"{source} blob: {exc.reason}") from None
        trace.details["mode"] = blob.mode
        return text, blob

    def decrypter(self) -> BlobDecrypter:
        """The warm daemon's client when configured, else a KMS client of our own."""
        if self.config.warm_socket is not None:
            from resolver.warm import WarmDecrypter

            return WarmDecrypter(self.config)
        from resolver.kms import KmsDecrypter

        return KmsDecrypter(self.config)
