"""This uid's kernel key quota headroom (/proc/key-users against maxkeys/maxbytes)."""

from __future__ import annotations

from collections.abc import Iterator

from kmskeys.doctor.finding import OK, WARN, Finding
from kmskeys.keyusers import PROC_KEY_USERS, key_quota

QUOTA_WARN_FRACTION = 0.8


def check_quota(uid: int) -> Iterator[Finding]:
    """This uid's kernel key quota headroom (/proc/key-users against maxkeys/maxbytes)."""
    try:
        quota = key_quota(uid, PROC_KEY_USERS)
    except OSError as exc:
        yield Finding(
            WARN,
            "quota",
            f"cannot read {PROC_KEY_USERS} ({exc.strerror})",
            "mount -t proc proc /proc",
        )
        return
    if quota is None:
        yield Finding(OK, "quota", f"uid {uid} holds no keys yet (quota untouched)")
        return
    keys, max_keys, used, max_bytes = quota
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
            OK, "quota", f"uid {uid} key quota: {keys}/{max_keys} keys, {used}/{max_bytes} bytes"
        )
