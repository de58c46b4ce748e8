"""DPAPI rows: protect/unprotect throughput against raw AESGCM, a fresh `kmskeys unprotect`
beside `systemd-creds decrypt`, and the `stored:` miss and hit.

Runs its own stored: install (removed afterwards), so it works alone as
`python -m tests.bench.dpapi` as well as in `make bench`.
systemd-creds creates /var/lib/systemd/credential.secret when it is missing; this module
removes it again if it created it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from kmskeys import Keyring, dpapi
from tests.bench.client import hit_rows
from tests.bench.common import (
    BenchContext,
    Row,
    host_credential,
    median,
    percentile,
    row,
    time_process,
)
from tests.stored.harness import StoredInstall, stored_installed
from tests.support.names import unique

MIB = 1 << 20
# (size, interleaved rounds): enough for a stable median on a shared 2-vCPU machine.
THROUGHPUT = ((1 * MIB, 25), (64 * MIB, 5))
BUDGET = 0.8
FRESH_RUNS = 20
FRESH_BUDGET = 2.0
MISS_RUNS = 25


class _Discard:
    """A sink that keeps nothing: the rows time the crypto path, not a copy into memory."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return len(data)


def _seconds(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def _raw_encrypt(key: bytes, data: bytes) -> Callable[[], object]:
    """The faster of one-shot AESGCM and AESGCM over 1 MiB chunks: the best raw can do here."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, nonce = AESGCM(key), os.urandom(12)

    def one_shot() -> object:
        return aead.encrypt(nonce, data, None)

    def chunked() -> object:
        out = bytearray(MIB + 16)
        view = memoryview(data)
        for at in range(0, len(data), MIB):
            piece = view[at : at + MIB]
            aead.encrypt_into(nonce, piece, None, memoryview(out)[: len(piece) + 16])
        return out

    return one_shot if _seconds(one_shot) <= _seconds(chunked) else chunked


def _raw_decrypt(key: bytes, data: bytes) -> Callable[[], object]:
    """The faster of one-shot AESGCM decrypt and decrypt_into over 1 MiB chunks."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, nonce = AESGCM(key), os.urandom(12)
    sealed = aead.encrypt(nonce, data, None)
    pieces = [aead.encrypt(nonce, data[at : at + MIB], None) for at in range(0, len(data), MIB)]

    def one_shot() -> object:
        return aead.decrypt(nonce, sealed, None)

    def chunked() -> object:
        out = bytearray(MIB)
        for piece in pieces:
            aead.decrypt_into(nonce, piece, None, memoryview(out)[: len(piece) - 16])
        return out

    return one_shot if _seconds(one_shot) <= _seconds(chunked) else chunked


def _protect(data: bytes, name: str, prefix: str) -> object:
    return dpapi.protect_stream(io.BytesIO(data), _Discard(), name=name, prefix=prefix)


def _unprotect(blob: bytes, prefix: str) -> object:
    return dpapi.unprotect_stream(io.BytesIO(blob), _Discard(), prefix=prefix)


def _median_mibs(size: int, samples: list[float]) -> float:
    return size / MIB / median(samples)


def _throughput_rows(install: StoredInstall) -> list[Row]:
    """Per size: the stream API against raw AESGCM (budgeted), the library calls (shown)."""
    prefix, name = install.stored_prefix, unique("bench")
    rows = []
    for size, rounds in THROUGHPUT:
        data, key = os.urandom(size), os.urandom(32)
        sink = io.BytesIO()
        dpapi.protect_stream(io.BytesIO(data), sink, name=name, prefix=prefix)
        blob = sink.getvalue()
        timed: dict[str, Callable[[], object]] = {
            "raw encrypt": _raw_encrypt(key, data),
            "raw decrypt": _raw_decrypt(key, data),
            "protect": partial(_protect, data, name, prefix),
            "unprotect": partial(_unprotect, blob, prefix),
            "protect_bytes": partial(dpapi.protect_bytes, data, name=name, prefix=prefix),
            "unprotect(bytes)": partial(dpapi.unprotect, blob, prefix=prefix),
        }
        samples: dict[str, list[float]] = {label: [] for label in timed}
        for _ in range(rounds):  # interleaved: every variant sees the same machine load
            for label, func in timed.items():
                samples[label].append(_seconds(func))
        mibs = {label: _median_mibs(size, taken) for label, taken in samples.items()}
        for label, raw in (("protect", "raw encrypt"), ("unprotect", "raw decrypt")):
            ratio = mibs[label] / mibs[raw]
            rows.append(
                row(
                    f"DPAPI {label} throughput, {size // MIB} MiB: stream API "
                    f"({label}_stream from an io.BytesIO)",
                    value=f"{mibs[label]:.0f} MiB/s",
                    baseline=f"raw cryptography AESGCM {mibs[raw]:.0f} MiB/s",
                    ratio=f"{ratio:.2f}x",
                    budget=f"≥ {BUDGET}x",
                    ok=ratio >= BUDGET,
                )
            )
        rows.append(
            row(
                f"DPAPI protect_bytes / unprotect, {size // MIB} MiB: library, binary blob",
                value=f"{mibs['protect_bytes']:.0f} / {mibs['unprotect(bytes)']:.0f} MiB/s",
                baseline=f"raw {mibs['raw encrypt']:.0f} / {mibs['raw decrypt']:.0f} MiB/s",
                ratio=f"{mibs['protect_bytes'] / mibs['raw encrypt']:.2f}x / "
                f"{mibs['unprotect(bytes)'] / mibs['raw decrypt']:.2f}x",
                budget="reported (the result is a new bytes object: one more allocation)",
                ok=True,
            )
        )
    # The one-line text form (what kmskeys.protect returns) adds base64: shown, not budgeted.
    data = os.urandom(MIB)
    text = dpapi.protect(data, name=name, prefix=prefix)
    text_s = [_seconds(partial(dpapi.protect, data, name=name, prefix=prefix)) for _ in range(15)]
    back_s = [_seconds(partial(dpapi.unprotect, text, prefix=prefix)) for _ in range(15)]
    raw_s = [_seconds(_raw_encrypt(os.urandom(32), data)) for _ in range(15)]
    rows.append(
        row(
            "kmskeys.protect / unprotect, 1 MiB: text form (base64url one-liner)",
            value=f"{_median_mibs(MIB, text_s):.0f} / {_median_mibs(MIB, back_s):.0f} MiB/s",
            baseline=f"raw AESGCM encrypt {_median_mibs(MIB, raw_s):.0f} MiB/s",
            ratio=f"{median(raw_s) / median(text_s):.2f}x",
            budget="reported (base64 dominates: bulk data goes through the stream API)",
            ok=True,
        )
    )
    return rows


def _fresh_row(ctx: BenchContext, install: StoredInstall) -> Row:
    """A new process unprotecting 1 KiB (master key cached) beside systemd-creds decrypt: the
    installed command (its C path, bin/unprotect.c) and the Python CLI it falls back to."""
    bindir = Path(ctx.python).parent
    plain = os.urandom(1024)
    blob = ctx.tmp / "dpapi.blob"
    with blob.open("wb") as out:
        dpapi.protect_stream(
            io.BytesIO(plain), out, name=unique("fresh"), prefix=install.stored_prefix
        )
    with host_credential(ctx.tmp, plain) as creds_argv:
        ours_argv = [str(bindir / "kmskeys"), "unprotect", "--prefix", install.stored_prefix]
        python_argv = [str(bindir / "kmskeys-py"), *ours_argv[1:]]
        for argv in (ours_argv, python_argv):
            with blob.open("rb") as src:
                check = subprocess.run(argv, stdin=src, capture_output=True, check=True)
            assert check.stdout == plain
        bare, ours, python, theirs = [], [], [], []
        for _ in range(FRESH_RUNS):
            bare.append(time_process([ctx.python, "-c", "pass"]))
            with blob.open("rb") as src:
                ours.append(time_process(ours_argv, stdin=src))
            with blob.open("rb") as src:
                python.append(time_process(python_argv, stdin=src))
            theirs.append(time_process(creds_argv, stderr=subprocess.DEVNULL))
    o, t, b, p = (median(x) * 1000 for x in (ours, theirs, bare, python))
    return row(
        "fresh process: kmskeys unprotect of 1 KiB (master key cached in the kernel)",
        value=f"{o:.1f} ms",
        baseline=f"systemd-creds decrypt --with-key=host {t:.1f} ms; the Python CLI "
        f"(kmskeys-py unprotect) {p:.1f} ms; python -c pass {b:.1f} ms",
        ratio=f"{o / t:.2f}x systemd-creds",
        budget=f"≤ {FRESH_BUDGET:.0f}x systemd-creds",
        ok=o <= FRESH_BUDGET * t,
    )


def _miss_row(install: StoredInstall) -> list[Row]:
    first, again = [], []
    names = [unique("miss") for _ in range(MISS_RUNS)]
    for name in names:  # first request: the resolver creates and fsyncs the entry
        Keyring.join_session()
        start = time.perf_counter()
        install.request(name)
        first.append((time.perf_counter() - start) * 1000)
        install.log.collect()
    for name in names:  # after a "reboot": nothing cached, the entry is read back
        Keyring.join_session()
        start = time.perf_counter()
        install.request(name)
        again.append((time.perf_counter() - start) * 1000)
        install.log.collect()
    install.log.drain()
    f50, a50 = median(first), median(again)
    return [
        row(
            f"stored: miss, request_key to key, p50 / p95 over {MISS_RUNS} cold requests",
            value=f"first (creates) {f50:.0f} / {percentile(first, 95):.0f} ms",
            baseline=f"entry exists {a50:.0f} / {percentile(again, 95):.0f} ms",
            ratio=f"{f50 / a50:.2f}x",
            budget="reported",
            ok=True,
        )
    ]


def rows(ctx: BenchContext) -> list[Row]:
    """Every DPAPI and stored: row, on an install of their own."""
    Keyring.join_session()
    with stored_installed() as install:
        try:
            out = _throughput_rows(install)
            out.append(_fresh_row(ctx, install))
            out += _miss_row(install)
            name = unique("hit")
            Keyring.join_session()
            install.request(name)  # cached in this session keyring from here on
            for hit in hit_rows(ctx, install.stored_prefix, name):
                hit["row"] = "stored: " + str(hit["row"])
                out.append(hit)
        finally:
            Keyring.join_session()
    return out


if __name__ == "__main__":
    from tests.bench.__main__ import main

    sys.exit(main(["tests.bench.dpapi"]))
