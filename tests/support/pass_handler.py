"""A request-key program for the pass tests: resolver.passstore run as the resolver will run it.

Rule: `create user PREFIX:* * PROGRAM %k %u DIR` (tests/support/pass_rule.py writes it). Run by
/sbin/request-key as root, it assumes authority over key %k, parses what follows `PREFIX:` with
the shared grammar (kmskeys.passname), locates the store of uid %u (the kernel's, never the
requester's word) with the templates of DIR/config.json (root's config: per-uid overrides), and
instantiates the key with the selected part, or rejects it with the errno of the failure class.
It writes DIR/verdict-N.json (N = the key's serial): the outcome and the error's class and
message, never the payload.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

NEGATIVE_TTL = 5
DEADLINE = 20.0


def _templates(directory: Path, uid: int) -> dict[str, str]:
    config = json.loads((directory / "config.json").read_text())
    chosen: dict[str, str] = config.get("users", {}).get(str(uid), {})
    return chosen


def main(argv: list[str]) -> int:
    """Handle one request; always answers the key and writes the verdict."""
    from kmskeys import keyutils
    from kmskeys.contract import ERRNO_REFUSED

    key, uid, directory = int(argv[0]), int(argv[1]), Path(argv[2])
    deadline = time.monotonic() + DEADLINE
    keyutils.keyctl_assume_authority(key)
    verdict: dict[str, object]
    try:
        from kmskeys.passname import parse_pass_description
        from resolver import passstore

        description = keyutils.keyctl_describe_alloc(key).decode().split(";", 4)[4]
        name, query = parse_pass_description(description.partition(":")[2])
        templates = _templates(directory, uid)
        location = passstore.locate(
            uid,
            store_template=templates.get("store", passstore.STORE_TEMPLATE),
            gnupg_template=templates.get("gnupg", passstore.GNUPG_TEMPLATE),
        )
        payload = passstore.resolve(location, name, query, deadline)
    except Exception as exc:
        answer = getattr(exc, "answer_errno", ERRNO_REFUSED)
        verdict = {"ok": False, "error": type(exc).__name__, "reason": str(exc), "errno": answer}
        keyutils.keyctl_reject(key, NEGATIVE_TTL, answer, 0)
    else:
        verdict = {"ok": True, "size": len(payload)}
        keyutils.keyctl_instantiate(key, payload, 0)
    (directory / f"verdict-{key}.json").write_text(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    # Run as a script by request-key: the repository's root, not this directory, is the path.
    sys.path[0] = os.fspath(Path(__file__).resolve().parents[2])
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception:
        import traceback

        Path(sys.argv[3], "crash.txt").write_text(traceback.format_exc())
        raise
