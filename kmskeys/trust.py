"""What root may trust on disk: the one rule shared by the resolver and `kmskeys doctor`.

A file or directory that root reads on behalf of any local user (config, credentials, blobs, the
warm daemon's socket) must be owned by root and writable by nobody else. Doctor reports exactly
what the resolver enforces, so both use this function.
"""

from __future__ import annotations

import os
import stat


def unsafe_reason(st: os.stat_result) -> str | None:
    """Why a file with this stat must not be trusted by root, or None if it may be."""
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
