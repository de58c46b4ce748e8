"""The `kms:` backend: NAME's blob (inline, or NAME.kms in blob_dir), decrypted by KMS.

The blob comes from the callout or from a root-owned file below blob_dir; the values KMS binds
it to (name, user, and for a unit-bound blob the requester's systemd unit, resolver/binding.py)
come from the request. Every check comes first: the blob's expiry, user and unit binding, then
the key allowlist (the gateway's `authorize`, resolver/kms.py). Then the host
cache (resolver/hostcache.py, through resolver/cachedfetch.py): one Decrypt per host for each
blob, whatever keyring or uid asks, and a stale answer when KMS is unavailable. Decryption goes
through the gateway, in the handler or in the resolver daemon (resolver/daemon.py), which keeps
its KMS clients.
"""

from __future__ import annotations

from dataclasses import replace

from kmskeys import fileio
from kmskeys.blob import MAX_BLOB_CHARS, Blob, BlobFormatError, parse_blob
from kmskeys.contract import BLOB_SUFFIX, hostcache_entry
from resolver.backend import Context, Request, Result
from resolver.cachedfetch import Through
from resolver.config import Config
from resolver.errors import RefusedError, UnknownSecretError
from resolver.gateway import Authorized, Gateway
from resolver.hostcache import Cache, HostCache, blob_digest
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
        if blob.binds_unit:
            # The unit KMS binds the blob to: read from the requester's cgroup, never the blob.
            request = replace(request, unit=requester_unit(context))
        if not self.config.host_cache:
            authorized = self.authorize(blob, request)
            return Result(self.decrypt(authorized, request, context), details=context.notes)
        # Only an identical request hits: same prefix and name, same user (unit) for a blob
        # bound to one (KMS binds it to that user, unit), same blob: its canonical text,
        # whatever the spelling.
        desc = hostcache_entry(
            request.prefix,
            request.name,
            request.user if blob.binds_user else None,
            blob_digest(blob.identity().encode("ascii")),
            request.unit if blob.binds_unit else None,
        )
        cache = self.cache()
        try:
            # Every check comes before the cache is consulted, exactly as before a KMS call:
            # the cache must never be a way around one. A refusal also drops the entry.
            authorized = self.authorize(blob, request)
        except RefusedError:
            cache.purge(desc)
            raise

        def refresh(context: Context) -> bytes:
            return self.decrypt(authorized, request, context)

        return Through(self.config, cache, desc, refresh, request=request).fetch(context)

    def authorize(self, blob: Blob, request: Request) -> Authorized[bytes]:
        """The blob's own checks, then the key allowlist: cheap refusals first, so that a key
        or region the config does not list never reaches a KMS client (and never
        makes this process import botocore)."""
        try:
            # A blob made for another user or unit (its name was checked on load), before the
            # host cache and KMS; not on load, where prefetch reads bound blobs to skip them.
            blob.check_request(request.name, request.user, request.unit)
        except BlobFormatError as exc:
            raise RefusedError(exc.reason) from None
        check_blob(blob, request.user)
        return self.gateway.authorize(BlobDecrypt(blob, request))

    def decrypt(self, authorized: Authorized[bytes], request: Request, context: Context) -> bytes:
        """The blob's plaintext, from KMS through the gateway (in the resolver daemon, with the
        clients it keeps)."""
        return open_blob(
            self.gateway, authorized, context.budget, context.deadline, context.timings
        )

    def cache(self) -> Cache:
        """The host cache (root's keyring), made on first use."""
        if self._cache is None:
            self._cache = HostCache(self.config)
        return self._cache

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


def requester_unit(context: Context) -> str:
    """The requester's systemd unit, for a unit-bound blob (resolver/binding.py)."""
    if context.binding is None:
        raise RefusedError("blob is bound to a systemd unit: no requester is identified here")
    return context.binding.unit(context)


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
