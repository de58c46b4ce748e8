"""The page of the CGI example (secret.py runs it): a 20 ms process that needs a secret, without
boto3 or AWS access.

Every request is a new process. `kmskeys.get_secret` asks the kernel, which answers from its
cache in microseconds; only the first request after a flush or expiry waits for the root
resolver's single KMS Decrypt. The page shows a fingerprint of the secret, never the secret.

The deployer names the secret in the web server's config, not in the code: KMSKEYS_SECRET
(e.g. db-password) and KMSKEYS_PREFIX (the resolver's prefix, "kms" on a default install),
set with lighttpd's setenv.add-environment, nginx's fastcgi_param or Apache's SetEnv.

A module, not the script itself: Python compiles the script it is given on every run, and keeps
the bytecode of the modules it imports (in __pycache__, or byte-compiled at deploy time).
"""

import hashlib
import os
import sys
import time

import kmskeys

NAME = os.environ.get("KMSKEYS_SECRET", "")
PREFIX = os.environ.get("KMSKEYS_PREFIX", "kms")


def escape(text: str) -> str:
    """HTML-escape `text` (not `html.escape`: importing html loads re, a cost on every request)."""
    for char, entity in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;")):
        text = text.replace(char, entity)
    return text


def respond(status: str, body: str, *headers: str) -> None:
    """Write one CGI response (headers, blank line, body) to stdout."""
    head = "".join(f"{h}\r\n" for h in (f"Status: {status}", *headers))
    sys.stdout.write(f"{head}Content-Type: text/html; charset=utf-8\r\n\r\n{body}")


def main() -> int:
    """Fetch the secret, use it (here: fingerprint it), answer the request."""
    if not NAME:
        print("secret.py: KMSKEYS_SECRET is not set in the web server's config", file=sys.stderr)
        respond("500 Internal Server Error", "<p>no secret configured")
        return 0
    shown = escape(NAME)
    start = time.perf_counter()
    try:
        secret = kmskeys.get_secret(NAME, prefix=PREFIX)
    except kmskeys.TemporarilyUnavailableError as exc:
        # KMS unreachable or throttled. Not cached (the kernel never finds a key rejected with
        # EAGAIN): the next request asks the resolver, and KMS, again. Retry-After paces clients.
        print(f"secret.py: {exc}", file=sys.stderr)
        unavailable = f"<p>{shown}: temporarily unavailable"
        respond("503 Service Unavailable", unavailable, "Retry-After: 10")
        return 0
    except kmskeys.KmsKeysError as exc:
        # The full message (it names the resolver log) goes to the server's error log only.
        print(f"secret.py: {exc}", file=sys.stderr)
        respond("500 Internal Server Error", f"<p>{shown}: {type(exc).__name__}")
        return 0
    took_us = (time.perf_counter() - start) * 1e6
    # A real application would open its database connection here. A bare hash of a
    # low-entropy password lets anyone who sees it test guesses: fine for a demo, not for prod.
    fingerprint = hashlib.sha256(secret).hexdigest()[:16]
    respond(
        "200 OK",
        "<!doctype html><title>kmskeys CGI example</title>\n"
        f'<p>secret <code id="name">{shown}</code> obtained in '
        f'<span id="us">{took_us:.0f}</span> µs\n'
        f'<p>sha256 <code id="fingerprint">{fingerprint}</code>, '
        f'<span id="size">{len(secret)}</span> bytes (the secret itself is never shown)\n'
        f'<p>served by process <span id="pid">{os.getpid()}</span>\n',
    )
    return 0
