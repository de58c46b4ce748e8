"""A request-key program for the identification tests: resolver.requester as the handler runs it.

Rule: `create user PREFIX:* * PYTHON identify_handler.py %k %u DIR` (tests/support/identity.py
writes it). Run by /sbin/request-key as root, it assumes authority over key %k, then by the
name after `PREFIX:`:

- `plain-*`: instantiates at once, identifying nothing (the bench's baseline miss);
- `hold-*`: writes DIR/held-NAME.json (its authorization key and the target) and waits for
  DIR/release-NAME before identifying, so a test can forge /proc/keys lines or kill the
  requester meanwhile;
- anything else: identifies at once.

It identifies the requester (`resolver.requester.identify`), checks DIR/policy.json if present
(`resolver.programpolicy`), and instantiates the key with what it saw as JSON, or rejects it
with the errno of the failure class. Either way it writes DIR/verdict-NAME.json. `bench-*`
names also time the identification and the policy check, with the imports of the two modules
(what the resolver's handler loads anyway is loaded first), in wall-clock and CPU time, and put
the figures in the payload.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resolver.requester import Requester

HOLD_LIMIT = 20.0
NEGATIVE_TTL = 5


def _nspid(tid: int) -> list[int]:
    """The requester's ids in each pid namespace, outermost first (NSpid of its status)."""
    for line in Path(f"/proc/{tid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return []


def _publish(path: Path, value: object) -> None:
    """Write `path` whole or not at all: the test reads it as soon as it exists."""
    draft = path.with_suffix(".draft")
    draft.write_text(json.dumps(value))
    os.replace(draft, path)


def _hold(directory: Path, name: str, key: int) -> None:
    from resolver.requester import own_auth_key

    held = {"auth": own_auth_key(), "target": key}
    _publish(directory / f"held-{name}.json", held)
    release = directory / f"release-{name}"
    limit = time.monotonic() + HOLD_LIMIT
    while not release.exists() and time.monotonic() < limit:
        time.sleep(0.01)


def _identify(
    key: int, uid: int, directory: Path, bench: bool
) -> tuple[Requester, dict[str, object]]:
    """The requester, and what the handler saw as a JSON-able dict; raises the identification's
    errors."""
    policy_file = directory / "policy.json"
    keys = json.loads(policy_file.read_text()) if policy_file.exists() else None
    cpu = time.thread_time()
    ticks = [time.perf_counter()]
    from resolver.programpolicy import parse_program_policy, refusal
    from resolver.requester import identify

    ticks.append(time.perf_counter())
    who = identify(key, uid=uid)
    ticks.append(time.perf_counter())
    if keys is not None:
        refused = refusal(parse_program_policy(keys, "policy.json"), who)
        if refused is not None:
            from resolver.errors import RefusedError

            raise RefusedError(f"program policy ({refused.check}): {refused.reason}")
    ticks.append(time.perf_counter())
    seen = who.as_dict()
    if bench:
        seen["first_us"] = (ticks[-1] - ticks[0]) * 1e6
        # The CPU this thread spent (user and kernel): what a loaded machine cannot inflate.
        seen["cpu_us"] = (time.thread_time() - cpu) * 1e6
        seen["parts_us"] = [(b - a) * 1e6 for a, b in itertools.pairwise(ticks)]
    seen["nspid"] = _nspid(who.tid)
    seen["summary"] = who.summary()
    return who, seen


def main(argv: list[str]) -> int:
    """Handle one request; always answers the key and writes the verdict."""
    from kmskeys import keyutils
    from kmskeys.contract import ERRNO_REFUSED

    key, uid, directory = int(argv[0]), int(argv[1]), Path(argv[2])
    keyutils.keyctl_assume_authority(key)
    description = keyutils.keyctl_describe_alloc(key).decode().split(";", 4)[4]
    name = description.partition(":")[2]
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name):
        keyutils.keyctl_reject(key, NEGATIVE_TTL, ERRNO_REFUSED, 0)
        return 1
    # What the resolver's handler has loaded before it would identify anyone, in every mode:
    # the bench's pairs differ by the identification alone.
    import resolver.handler  # noqa: F401

    verdict: dict[str, object]
    try:
        if name.startswith("plain-"):
            seen: dict[str, object] = {"plain": True}
        else:
            if name.startswith("hold-"):
                _hold(directory, name, key)
            who, seen = _identify(key, uid, directory, bench=name.startswith("bench-"))
            # As the handler will, just before answering: a requester killed since it was
            # identified receives nothing.
            from resolver.requester import check_alive

            check_alive(who)
    except Exception as exc:
        answer = getattr(exc, "answer_errno", ERRNO_REFUSED)
        verdict = {"ok": False, "error": type(exc).__name__, "reason": str(exc), "errno": answer}
        try:
            keyutils.keyctl_reject(key, NEGATIVE_TTL, answer, 0)
            verdict["answered"] = "rejected"
        except Exception as failed:
            verdict["answered"] = f"reject failed: {failed}"
    else:
        verdict = {"ok": True, "identity": seen}
        try:
            keyutils.keyctl_instantiate(key, json.dumps(seen).encode(), 0)
            verdict["answered"] = "instantiated"
        except Exception as failed:
            verdict["answered"] = f"instantiate failed: {failed}"
    _publish(directory / f"verdict-{name}.json", verdict)
    return 0


if __name__ == "__main__":
    # Run as a script by request-key: the repository's root, not this directory, is the path.
    sys.path[0] = os.fspath(Path(__file__).resolve().parents[2])
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception:
        # request-key discards stderr: leave the traceback where the test looks.
        import traceback

        Path(sys.argv[3], "crash.txt").write_text(traceback.format_exc())
        raise
