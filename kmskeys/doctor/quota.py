"""This uid's kernel key quota headroom (/proc/key-users against maxkeys/maxbytes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kmskeys.doctor.finding import OK, WARN, Finding

PROC_KEY_USERS = Path("/proc/key-users")
QUOTA_WARN_FRACTION = 0.8


def check_quota(uid: int) -> Iterator[Finding]:
    """This uid's kernel key quota headroom (/proc/key-users against maxkeys/maxbytes)."""
    try:
        lines = PROC_KEY_USERS.read_text().splitlines()
    except OSError as exc:
        yield Finding(
            WARN,
            "quota",
            f"cannot read {PROC_KEY_USERS} ({exc.strerror})",
            "mount -t proc proc /proc",
        )
        return
    for line in lines:
        head, _, rest = line.partition(":")
        if head.strip() != str(uid):
            continue
        # "<uid>: <usage> <nkeys>/<nikeys> <qnkeys>/<maxkeys> <qnbytes>/<maxbytes>"
        fields = rest.split()
        keys, max_keys = (int(x) for x in fields[2].split("/"))
        used, max_bytes = (int(x) for x in fields[3].split("/"))
        if keys >= QUOTA_WARN_FRACTION * max_keys or used >= QUOTA_WARN_FRACTION * max_bytes:
            sysctl = "kernel.keys.root_max" if uid == 0 else "kernel.keys.max"
            yield Finding(
                WARN,
                "quota",
                f"uid {uid} uses {keys}/{max_keys} keys and {used}/{max_bytes} bytes of its key "
                "quota: new secrets will fail with EDQUOT",
                f"sysctl -w {sysctl}keys={max(2 * max_keys, 2 * keys)} "
                f"{sysctl}bytes={max(2 * max_bytes, 2 * used)}",
            )
        else:
            yield Finding(
                OK,
                "quota",
                f"uid {uid} key quota: {keys}/{max_keys} keys, {used}/{max_bytes} bytes",
            )
        return
    yield Finding(OK, "quota", f"uid {uid} holds no keys yet (quota untouched)")
