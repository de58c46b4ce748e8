"""The `kms:` backend: NAME's blob (inline, or NAME.kms in blob_dir), decrypted by KMS.

The blob comes from the callout or from a root-owned file below blob_dir; the values KMS binds
it to (name, user) come from the request. Decryption goes through the warm daemon when one is
configured and answering, else through a KMS client built in this process (resolver/kms.py).
"""

from __future__ import annotations

from kmskeys.blob import MAX_BLOB_CHARS, Blob, BlobFormatError, parse_blob
from kmskeys.contract import BLOB_SUFFIX
from resolver.backend import BlobDecrypter, Request, Trace
from resolver.config import Config
from resolver.errors import RefusedError
from resolver.policy import check_blob, check_key
from resolver.safefile import read_below


class BlobBackend:
    """Loads, checks and decrypts the blob for one request."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def resolve(self, request: Request, deadline: float, trace: Trace) -> bytes:
        """The plaintext of NAME's blob for this request."""
        blob = self.load(request, trace)
        check_blob(blob, request.user)
        # Cheap refusals come first: a key or region the config does not list never reaches
        # the daemon or a KMS client (and never makes this process import botocore).
        check_key(self.config, blob)
        return self.decrypter().decrypt(blob, request, deadline, trace.timings)

    def load(self, request: Request, trace: Trace) -> Blob:
        """The request's blob: inline in the callout, else blob_dir/NAME.kms."""
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
        except BlobFormatError as exc:
            raise RefusedError(f"{source} blob: {exc.reason}") from None
        trace.details["mode"] = blob.mode
        return blob

    def decrypter(self) -> BlobDecrypter:
        """The warm daemon's client when configured, else a KMS client of our own."""
        if self.config.warm_socket is not None:
            from resolver.warm import WarmDecrypter

            return WarmDecrypter(self.config)
        from resolver.kms import KmsDecrypter

        return KmsDecrypter(self.config)
