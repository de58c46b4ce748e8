"""The `pass:` backend: the requester's own password-store entry, decrypted as that user.

The essay's "resolver to cache from my password manager". The pipeline has already applied the
`[pass."GLOB"]` policy (resolver/policy.py); here the selector is checked, the store of the
kernel's %u is located from root's templates (resolver/spec_pass.py), and the entry is opened
and decrypted as that user (resolver/passstore.py, resolver/gpgdecrypt.py), within a share of
the handler's deadline. Nothing goes to the host cache: the secret is one user's, decrypted
with that user's own key while that user's agent is unlocked, and a copy in root's keyring
would outlive the lock, the logout and a `kmskeys flush` of the user's own (docs/tokens.md).
"""

from __future__ import annotations

import time

from kmskeys.errors import InvalidNameError
from kmskeys.passname import parse_selector
from resolver import passstore
from resolver.backend import Context, Request, Result
from resolver.config import Config
from resolver.errors import RefusedError


class PassBackend:
    """Serves `pass:` requests from the requesting user's password store."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def resolve(self, request: Request, context: Context) -> Result:
        """The part of the entry the description selects, with the name's (short) ttl."""
        try:
            query = parse_selector(request.qualifier)
        except InvalidNameError as exc:
            raise RefusedError(str(exc)) from None
        if request.callout:
            # The entry is the user's file, named by the description alone: there is nothing a
            # callout could add, and nothing of the requester's is read.
            raise RefusedError("a pass: request takes no callout (no blob, no size)")
        context.notes.update(source="pass", mode=query.kind)
        location = passstore.locate(
            request.uid,
            store_template=self.config.pass_store_dir,
            gnupg_template=self.config.pass_gnupg_home,
        )
        payload = passstore.resolve(
            location,
            request.name,
            query,
            self.gpg_deadline(context.deadline),
            timings=context.timings,
            gpg=str(self.config.pass_gpg),
        )
        return Result(payload, ttl=self.ttl(request), details=context.notes)

    def gpg_deadline(self, deadline: float) -> float:
        """When gpg must be done: its share of the time left, the rest kept to answer."""
        now = time.monotonic()
        return now + max(0.0, deadline - now) * self.config.pass_deadline_share

    def ttl(self, request: Request) -> int:
        """The `[pass."GLOB"]` rule's ttl, else `pass_ttl` (never the core `ttl`)."""
        rule = self.config.rule_for(request.name, request.prefix)
        if rule is not None and rule.ttl is not None:
            return rule.ttl
        return self.config.pass_ttl
