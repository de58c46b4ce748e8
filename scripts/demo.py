"""`make demo`: a key round trip through the kernel (the full chain arrives with the resolver)."""

from __future__ import annotations

import hashlib
import sys
import time

import kmskeys
from kmskeys import Keyring


def main() -> int:
    """Add a secret to a fresh session keyring, read it back through get_secret, flush it."""
    ring = Keyring.join_session()
    try:
        secret = b"demo-" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:16].encode()
        ring.add("user", "kmsdemo:greeting", secret)
        start = time.perf_counter()
        got = kmskeys.get_secret("greeting", prefix="kmsdemo")
        took = (time.perf_counter() - start) * 1e6
        fingerprint = hashlib.sha256(got).hexdigest()[:12]
        print(f"cached key read back in {took:.0f} µs, sha256 {fingerprint} (secret not shown)")
        return 0 if got == secret else 1
    finally:
        ring.clear()


if __name__ == "__main__":
    sys.exit(main())
