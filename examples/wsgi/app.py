"""WSGI example: a long-running app that reads its secrets at request time, never at import time.

Reading a secret once at import is the classic pitfall of secret caches: the process keeps the
old value after a rotation until someone restarts it, and an import that runs before the host's
resolver is ready kills the worker. `kmskeys.get_secret` is a kernel cache hit of a few
microseconds, so asking on every request costs nothing and picks up `kmskeys flush` at once.

    KMSKEYS_NAMES=db-password python app.py --port 8000 --prefix kms   # stdlib wsgiref
    KMSKEYS_NAMES=db-password gunicorn 'app:application'               # or any WSGI server

The deployer names the secrets the app may read, in its environment (a systemd unit's
`Environment=KMSKEYS_NAMES=db-password,api-token`), not in the code. GET /db-password answers
with the secret's fingerprint (never the secret) as JSON; the first name is served at /.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from wsgiref.simple_server import make_server

import kmskeys

# Which secrets this app may fingerprint; nothing else is looked up, whatever the path says.
NAMES = tuple(name for name in os.environ.get("KMSKEYS_NAMES", "").split(",") if name)
PREFIX = os.environ.get("KMSKEYS_PREFIX", "kms")

StartResponse = Callable[[str, list[tuple[str, str]]], object]


def answer(start_response: StartResponse, status: str, doc: dict[str, object]) -> list[bytes]:
    """A JSON response."""
    body = json.dumps(doc).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def make_app(
    prefix: str = PREFIX, names: tuple[str, ...] = NAMES
) -> Callable[[dict[str, object], StartResponse], Iterable[bytes]]:
    """A WSGI application serving `names` under the resolver's `prefix`."""

    def application(environ: dict[str, object], start_response: StartResponse) -> Iterable[bytes]:
        if not names:
            print("app: KMSKEYS_NAMES is not set: no secret may be read", file=sys.stderr)
            return answer(start_response, "500 Internal Server Error", {"error": "no secrets"})
        name = str(environ.get("PATH_INFO", "")).strip("/") or names[0]
        if name not in names:
            return answer(start_response, "404 Not Found", {"error": "no such secret here"})
        try:
            secret = kmskeys.get_secret(name, prefix=prefix)  # now, not at import time
        except kmskeys.TemporarilyUnavailableError:
            # Not cached (the kernel never finds a key rejected with EAGAIN): the next request
            # asks the resolver, and KMS, again.
            return answer(start_response, "503 Service Unavailable", {"error": "try again later"})
        except kmskeys.KmsKeysError as exc:
            print(f"app: {name}: {exc}", file=sys.stderr)  # names the resolver log, never a secret
            return answer(
                start_response, "500 Internal Server Error", {"error": type(exc).__name__}
            )
        digest = hashlib.sha256(secret).hexdigest()[:16]
        return answer(
            start_response, "200 OK", {"name": name, "sha256": digest, "bytes": len(secret)}
        )

    return application


# For WSGI servers that import `app:application` (gunicorn, uwsgi, mod_wsgi).
application = make_app()


def main(argv: list[str] | None = None) -> int:
    """Serve the app with the stdlib's wsgiref on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefix", default=PREFIX, help="the resolver's prefix (default: kms)")
    args = parser.parse_args(argv)
    if not NAMES:
        parser.error("set KMSKEYS_NAMES to the secrets this app may read (NAME[,NAME...])")
    with make_server(args.host, args.port, make_app(args.prefix)) as server:
        print(f"serving on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
