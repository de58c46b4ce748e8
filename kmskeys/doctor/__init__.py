"""`kmskeys doctor`: check this host's kmskeys set-up; one line per finding, with a fix to paste.

Every `FAIL` and `warn` carries a command that fixes it when pasted into a root shell. The rule
in /etc/request-key.d says which resolver and config a miss really uses; that resolver judges
its own config, dependencies and blob files (`kmskeys-resolver check`, run in its interpreter),
because this client never imports the resolver. Nothing is decrypted and KMS is never called.
`--json` prints the same findings as one JSON object.

One module per check (keyctl, rule, routes, upcall, config, dependencies, blobs, syslog, daemon,
quota, session, negative, imds, programs, stored, tools, refresher), each yielding `Finding`s
(finding.py); run.py orders them. Stdlib and the keyutils binding only (no boto3): it runs as
an app user as well as root. Part of the operator toolbox: the client's hot path never imports
it (the import contracts say so).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run every check; exit 1 if any finding is a failure."""
    from kmskeys.doctor.run import main as run

    return run(argv)
