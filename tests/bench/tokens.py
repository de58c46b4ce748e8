"""The essay's other resolvers (issue 25): a `pass:` miss against `pass show` run directly as the
user, and a token-sealed `stored:` miss against a KMS-sealed one.

Runs its own installs (removed afterwards): a test user with a real GnuPG key, agent and store;
a SoftHSM2 token in SoftHSM's own configuration (what request-key's resolver sees); a moto
server for the KMS seal. Works alone as `python -m tests.bench.tokens`.

- `pass:` miss: request_key to payload, as the user, a fresh session keyring each time (no host
  cache for `pass:`, so every one decrypts), against `pass show NAME` as the same user: the same
  gpg decryption behind both, so the ratio is what kmskeys adds (the upcall, the handler, the
  checks) or saves (no shell script).
- stored: miss, entry present (after a reboot, say): unsealed by the token (one RSA-OAEP
  decryption on SoftHSM2) against unsealed by KMS Decrypt (a moto server on 127.0.0.1). A
  YubiKey decrypts far slower than SoftHSM (docs/tokens.md): the host cache matters there.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kmskeys import Keyring
from tests.bench.common import BenchContext, Row, median, percentile, row
from tests.stored.harness import StoredInstall, stored_installed
from tests.support.kms_emulator import KmsEmulator
from tests.support.names import unique, unique_prefix
from tests.support.passgpg import PassOwner, pass_user, scratch
from tests.support.requester import as_user
from tests.support.softhsm import system_token

PASS_RUNS = 20
STORED_RUNS = 25
SEAL_HOST = "arn:aws:ec2:us-east-1:123456789012:instance/i-0a1b2c3d4e5f60718"


def _pass_misses(prefix: str, owner: PassOwner, runs: int) -> list[float]:
    """Milliseconds per cold `pass:` request, measured in the user's own process."""

    def measure() -> list[float]:
        from kmskeys import Key

        samples = []
        for _ in range(runs):
            Keyring.join_session()
            start = time.perf_counter()
            value = Key.request(f"{prefix}:email/work", "").read()
            samples.append((time.perf_counter() - start) * 1000)
            assert value == b"hunter2"
        return samples

    got = as_user(owner.pw.pw_name, measure)
    assert isinstance(got, dict) and "ok" in got, got
    return list(got["ok"])  # type: ignore[call-overload]


def _pass_show(owner: PassOwner, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        done = owner.run("pass", "show", "email/work")
        samples.append((time.perf_counter() - start) * 1000)
        assert done.stdout.startswith(b"hunter2\n")
    return samples


def pass_row() -> Row:
    """A `pass:` miss against `pass show` as the user, interleaved in rounds of five."""
    with (
        scratch() as base,
        pass_user(base) as owner,
        stored_installed(rules="pass", pass_prefix=unique_prefix()) as install,
    ):
        owner.unlock()
        prefix = str(install.settings["pass_prefix"])
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(PASS_RUNS // 5):
            ours += _pass_misses(prefix, owner, 5)
            theirs += _pass_show(owner, 5)
            install.log.drain()
    o, t = median(ours), median(theirs)
    return row(
        f"pass: miss, request_key to payload as the user, p50 / p95 over {PASS_RUNS}",
        value=f"{o:.0f} / {percentile(ours, 95):.0f} ms",
        baseline=f"`pass show` as the user {t:.0f} / {percentile(theirs, 95):.0f} ms",
        ratio=f"{o / t:.2f}x",
        budget="reported",
        ok=True,
    )


def _stored_misses(install: StoredInstall, names: list[str]) -> list[float]:
    samples = []
    for name in names:
        Keyring.join_session()
        start = time.perf_counter()
        install.request(name)
        samples.append((time.perf_counter() - start) * 1000)
        install.log.collect()
    install.log.drain()
    return samples


def stored_row(tmp: Path) -> Row:
    """Token-sealed against KMS-sealed `stored:` misses of existing entries, interleaved."""
    names = [unique("sealed") for _ in range(STORED_RUNS)]
    emulator = KmsEmulator().start()
    try:
        arn = emulator.client().create_key(Description="kmst bench seal")["KeyMetadata"]["Arn"]
        kms = {"seal": "kms", "seal_key_arn": arn, "seal_host": SEAL_HOST}
        with (
            system_token() as token,
            stored_installed(kms_endpoint=emulator.url, **kms) as by_kms,
            stored_installed(
                seal="pkcs11", token_module=token.module, token_label=token.label,
                token_key_label=token.key_label,
                token_pin_file=token.write_pin(tmp / f"{unique('pin')}.pin"),
            ) as by_token,
        ):  # fmt: skip
            for install in (by_kms, by_token):
                _stored_misses(install, names)  # the entries, made once (not timed)
            ours: list[float] = []
            theirs: list[float] = []
            for start in range(0, STORED_RUNS, 5):
                ours += _stored_misses(by_token, names[start : start + 5])
                theirs += _stored_misses(by_kms, names[start : start + 5])
    finally:
        emulator.stop()
        Keyring.join_session()
    o, t = median(ours), median(theirs)
    return row(
        f"stored: miss, entry sealed by a PKCS#11 token (SoftHSM2), p50 / p95 over {STORED_RUNS}",
        value=f"{o:.0f} / {percentile(ours, 95):.0f} ms",
        baseline=f"sealed by KMS (moto on 127.0.0.1) {t:.0f} / {percentile(theirs, 95):.0f} ms",
        ratio=f"{o / t:.2f}x",
        budget="reported",
        ok=True,
    )


def rows(ctx: BenchContext) -> list[Row]:
    """The `pass:` row and the token-seal row."""
    Keyring.join_session()
    try:
        return [pass_row(), stored_row(ctx.tmp)]
    finally:
        Keyring.join_session()


if __name__ == "__main__":
    from tests.bench.__main__ import main

    sys.exit(main(["tests.bench.tokens"]))
