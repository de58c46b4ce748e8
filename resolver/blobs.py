"""The `kms:` backend: NAME's blob (inline, or NAME.kms in blob_dir), decrypted by KMS.

The blob comes from the callout or from a root-owned file below blob_dir; the values KMS binds
it to (name, user) come from the request. Every check comes first: the blob's expiry and user
binding, then the key allowlist (the gateway's `authorize`, resolver/kms.py). Then the host
cache (resolver/hostcache.py): one Decrypt per host for each blob, whatever keyring or uid asks,
and a stale answer when KMS is unavailable. Decryption goes through the warm daemon when one is
configured and answering (resolver/warm.py), else through the gateway in this process.
"""

from __future__ import annotations

import time

from kmskeys import fileio
from kmskeys.blob import MAX_BLOB_CHARS, Blob, BlobFormatError, parse_blob
from kmskeys.contract import BLOB_SUFFIX, hostcache_entry
from resolver.backend import Context, Request, Result
from resolver.config import Config
from resolver.errors import (
    DeadlineExceeded,
    RefusedError,
    ServiceUnavailableError,
    UnknownSecretError,
)
from resolver.gateway import Authorized, Gateway
from resolver.hostcache import Cache, Entry, HostCache, blob_digest
from resolver.kms import BlobDecrypt, open_blob
from resolver.policy import check_blob


class BlobBackend:
    """Loads, checks and decrypts the blob for one request."""

    def __init__(
        self, config: Config, gateway: Gateway | None = None, cache: Cache | None = None
    ) -> None:
        self.config = config
        self.gateway = gateway if gateway is not None else Gateway(config)
        self._cache = cache

    def resolve(self, request: Request, context: Context) -> Result:
        """The plaintext of NAME's blob for this request."""
        _, blob = self.load(request, context.notes)
        if not self.config.host_cache:
            authorized = self.authorize(blob, request)
            return Result(self.decrypt(authorized, request, context), details=context.notes)
        # Only an identical request hits: same prefix and name, same user for a user-bound blob
        # (KMS binds it to that user), same blob: its canonical text, whatever the spelling.
        desc = hostcache_entry(
            request.prefix,
            request.name,
            request.user if blob.binds_user else None,
            blob_digest(blob.identity().encode("ascii")),
        )
        cache = self.cache()
        try:
            # Every check comes before the cache is consulted, exactly as before a KMS call:
            # the cache must never be a way around one. A refusal also drops the entry.
            authorized = self.authorize(blob, request)
        except RefusedError:
            cache.purge(desc)
            raise
        return self._cached(cache, desc, authorized, request, context)

    def authorize(self, blob: Blob, request: Request) -> Authorized[bytes]:
        """The blob's own checks, then the key allowlist: cheap refusals first, so that a key
        or region the config does not list never reaches the daemon or a KMS client (and never
        makes this process import botocore)."""
        try:
            # A blob made for another user (its name was checked on load), before the host
            # cache and KMS; not on load, where prefetch reads user-bound blobs to skip them.
            blob.check_request(request.name, request.user)
        except BlobFormatError as exc:
            raise RefusedError(exc.reason) from None
        check_blob(blob, request.user)
        return self.gateway.authorize(BlobDecrypt(blob, request))

    def decrypt(self, authorized: Authorized[bytes], request: Request, context: Context) -> bytes:
        """The warm daemon's answer when one is configured, else our own Decrypt."""
        if self.config.warm_socket is not None:
            from resolver.warm import WarmDecrypter

            return WarmDecrypter(self.config, self.gateway).decrypt(authorized, request, context)
        return open_blob(
            self.gateway, authorized, context.budget, context.deadline, context.timings
        )

    def cache(self) -> Cache:
        """The host cache (root's keyring), made on first use."""
        if self._cache is None:
            self._cache = HostCache()
        return self._cache

    def _cached(
        self,
        cache: Cache,
        desc: str,
        authorized: Authorized[bytes],
        request: Request,
        context: Context,
    ) -> Result:
        ttl = self.config.ttl_for(request.name, request.prefix)
        start = time.perf_counter()
        entry = cache.lookup(desc)
        context.timings.add("hostcache", (time.perf_counter() - start) * 1000)
        if entry is not None and entry.age < ttl:
            return self._hit(entry, context)
        try:
            # Refreshes of this entry by other keyrings' handlers wait here (up to
            # hostcache.REFRESH_WAIT), then find it fresh.
            with cache.refreshing(self.config.state_dir, desc):
                entry = cache.lookup(desc)
                if entry is not None and entry.age < ttl:
                    return self._hit(entry, context)
                return self._refresh(
                    cache,
                    desc,
                    entry,
                    authorized=authorized,
                    request=request,
                    context=context,
                    ttl=ttl,
                )
        except DeadlineExceeded:
            # The handler refreshing it hung on KMS past our deadline: KMS is unavailable.
            stale = self._stale(entry, context, "deadline exceeded")
            if stale is None:
                raise
            return stale

    def _refresh(
        self,
        cache: Cache,
        desc: str,
        entry: Entry | None,
        *,
        authorized: Authorized[bytes],
        request: Request,
        context: Context,
        ttl: int,
    ) -> Result:
        try:
            plaintext = self.decrypt(authorized, request, context)
        except (ServiceUnavailableError, DeadlineExceeded) as exc:
            # KMS is unavailable (never a refusal, never a uid over its own KMS rate).
            why = "deadline exceeded" if isinstance(exc, DeadlineExceeded) else exc.reason
            stale = self._stale(entry, context, why)
            if stale is None:
                raise
            return stale
        except RefusedError:
            # A refusal is never masked: a revoked permission takes effect at this refresh.
            cache.purge(desc)
            raise
        # Kept for stale answers past its freshness; the kernel drops it after that.
        cache.store(desc, plaintext, max(ttl, self.config.stale_grace) + 1)
        return Result(plaintext, details=context.notes)

    def _hit(self, entry: Entry, context: Context) -> Result:
        context.notes.update(source="hostcache", age=f"{entry.age:.0f}")
        return Result(entry.plaintext, details=context.notes)

    def _stale(self, entry: Entry | None, context: Context, why: str) -> Result | None:
        """An answer from `entry` while KMS is unavailable, if it is within stale_grace: with
        stale_ttl as the key's timeout, so that KMS is asked again soon."""
        grace = self.config.stale_grace
        if entry is None or not grace or entry.age > grace:
            return None
        context.notes.update(source="hostcache", age=f"{entry.age:.0f}", reason=why)
        return Result(entry.plaintext, ttl=self.config.stale_ttl, stale=True, details=context.notes)

    def load(self, request: Request, notes: dict[str, str]) -> tuple[bytes, Blob]:
        """The request's blob text and blob: inline in the callout, else blob_dir/NAME.kms."""
        source = "inline" if request.callout else "blob_dir"
        notes["source"] = source
        text = request.callout or read_blob(self.config, request.name)
        try:
            blob = parse_blob(text, allow_legacy=self.config.allow_legacy_blobs)
            # A blob made for another name is refused here, without KMS (issue 26).
            blob.check_request(request.name, None)
        except BlobFormatError as exc:
            raise RefusedError(f"{source} blob: {exc.reason}") from None
        notes["mode"] = blob.mode
        return text, blob


def read_blob(config: Config, name: str) -> bytes:
    """blob_dir/NAME.kms, read one component at a time: never through a link, and every step
    root-owned and not writable by others (names were validated: no '..', no empty segment)."""
    relative = name + BLOB_SUFFIX
    try:
        return fileio.read_below(
            config.blob_dir, relative, MAX_BLOB_CHARS + 2, f"blob_dir {config.blob_dir}", "blob"
        )
    except fileio.UntrustedFileError as exc:
        if exc.problem == fileio.MISSING:
            raise UnknownSecretError(str(exc)) from None
        raise RefusedError(str(exc)) from None
