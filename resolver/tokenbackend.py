"""The `token:` backend: NAME's `kmsp2:` blob (blob_dir/NAME.kmsp), opened by the host's token.

For hosts with no cloud KMS (bare metal, air-gapped): the build side encrypts with the token's
public key (`kmskeys encrypt --to pkcs11:...` or `--to key.pem`), the host's PKCS#11 token
unwraps. Every check comes first and costs the token nothing: the blob's recorded name and
user, its expiry, the key it was made for (TokenSession refuses another key before any private
operation). Then the host cache (resolver/hostcache.py), as for `kms:` blobs: one token
operation per host and blob, and a stale answer while the token is unavailable (a YubiKey
pulled out), within `stale_grace`.

Blobs come from root's blob_dir only, never from the callout. A token's public key is public:
anyone who has it can make a valid `kmsp2:` blob for any name. From a root-owned file, that is
root's choice; inline, it would let any requester spend the token's time and root's host cache
on blobs of its own making (a KMS blob is different: only a principal allowed to Encrypt under
the key can make one).
"""

from __future__ import annotations

from datetime import UTC, datetime

from kmskeys import fileio
from kmskeys.blobfields import CONTEXT_NOT_AFTER, BlobFormatError, parse_not_after
from kmskeys.contract import hostcache_entry
from kmskeys.tokenblob import BLOB_SUFFIX, MAX_BLOB_CHARS, TokenBlob, parse_token_blob
from resolver.backend import Context, Request, Result
from resolver.cachedfetch import Through
from resolver.config import Config
from resolver.errors import RefusedError, UnknownSecretError
from resolver.hostcache import Cache, HostCache, blob_digest


class TokenBlobBackend:
    """Loads, checks and opens the token blob of one request."""

    def __init__(self, config: Config, cache: Cache | None = None) -> None:
        self.config = config
        self._cache = cache

    def resolve(self, request: Request, context: Context) -> Result:
        """The plaintext of NAME's token blob for this request."""
        if request.callout:
            raise RefusedError(
                "a token: request takes no callout: token blobs come from blob_dir only (a "
                "token's public key is public, so an inline blob proves nothing about its maker)"
            )
        context.notes["source"] = "blob_dir"
        text = read_token_blob(self.config, request.name)
        blob = self.checked(text, request)
        if not self.config.host_cache:
            return Result(self.open(blob, request, context), details=context.notes)
        desc = hostcache_entry(
            request.prefix,
            request.name,
            request.user if blob.binds_user else None,
            blob_digest(blob.to_text().encode("ascii")),
        )
        return self._cached(desc, blob, request, context)

    def checked(self, text: bytes, request: Request) -> TokenBlob:
        """The parsed blob, if it was made for this name and user and has not expired."""
        try:
            blob = parse_token_blob(text)
            blob.check_request(request.name, request.user)
            not_after = blob.metadata.get(CONTEXT_NOT_AFTER)
            expiry = None if not_after is None else parse_not_after(not_after)
        except BlobFormatError as exc:
            raise RefusedError(f"blob_dir token blob: {exc.reason}") from None
        if expiry is not None and datetime.now(UTC) > expiry:
            raise RefusedError(f"blob expired at {expiry:%Y-%m-%dT%H:%M:%SZ}")
        if blob.binds_user and request.user is None:
            raise RefusedError("blob is bound to a user, but the requesting uid has no user name")
        return blob

    def open(self, blob: TokenBlob, request: Request, context: Context) -> bytes:
        """One token operation (its gateway: budget, timing, classification)."""
        from resolver.pkcs11seal import TokenSession, settings_from, token_call

        def opened(token: TokenSession) -> bytes:
            return token.open_blob(blob, request.name, request.user)

        settings = settings_from(self.config)
        return token_call(settings, context.budget, context.timings, opened)

    def cache(self) -> Cache:
        """The host cache (root's keyring), made on first use."""
        if self._cache is None:
            self._cache = HostCache(self.config)
        return self._cache

    def _cached(self, desc: str, blob: TokenBlob, request: Request, context: Context) -> Result:
        # Fresh, one token operation per host, stale while the token is unavailable (a
        # YubiKey pulled out), at most stale_wait of waiting for a hung one; a refusal (a
        # replaced token) purges the entry (resolver/cachedfetch.py).
        def refresh(context: Context) -> bytes:
            return self.open(blob, request, context)

        through = Through(self.config, self.cache(), desc, refresh, request=request, label="token")
        return through.fetch(context)


def read_token_blob(config: Config, name: str) -> bytes:
    """blob_dir/NAME.kmsp, read as blob_dir/NAME.kms is (kmskeys.fileio: no link, root's)."""
    try:
        return fileio.read_below(
            config.blob_dir, name + BLOB_SUFFIX, MAX_BLOB_CHARS + 2, f"blob_dir {config.blob_dir}",
            "token blob",
        )  # fmt: skip
    except fileio.UntrustedFileError as exc:
        if exc.problem == fileio.MISSING:
            raise UnknownSecretError(str(exc)) from None
        raise RefusedError(str(exc)) from None
