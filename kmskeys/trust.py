"""What root may trust: the rules shared by the resolver and `kmskeys doctor`.

A file or directory that root reads on behalf of any local user (config, credentials, blobs, the
resolver daemon's socket) must be owned by root and writable by nobody else; a unix socket peer is
who the kernel says it is (SO_PEERCRED). Doctor reports exactly what the resolver enforces, so
both use these functions.
"""

from __future__ import annotations

import os
import socket
import stat
import struct

# struct ucred { pid_t pid; uid_t uid; gid_t gid; } (socket(7), SO_PEERCRED)
_UCRED = struct.Struct("=iII")


def unsafe_reason(st: os.stat_result) -> str | None:
    """Why a file with this stat must not be trusted by root, or None if it may be."""
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def peer_uid(sock: socket.socket) -> int:
    """The uid the kernel recorded for the other end of a connected unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(creds)
    return int(uid)
