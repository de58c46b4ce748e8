"""A seccomp filter that refuses the key system calls, as Docker's default profile does.

`deny_key_syscalls(errno)` is a subprocess `preexec_fn`: the child, and whatever it runs, then
gets `errno` from add_key(2), request_key(2) and keyctl(2), and every other call as usual.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import platform

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
# BPF opcodes (linux/bpf_common.h)
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00
BPF_RET_K = 0x06 | 0x00
# struct seccomp_data: nr at offset 0, arch at offset 4
# machine -> (AUDIT_ARCH_*, (add_key, request_key, keyctl))
ARCHES = {
    "x86_64": (0xC000003E, (248, 249, 250)),
    "aarch64": (0xC00000B7, (217, 218, 219)),
}


class _Filter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def deny_key_syscalls(err: int = _errno.EPERM) -> None:
    """Install the filter in this process (irreversibly): call it in a child only."""
    arch, calls = ARCHES[platform.machine()]
    add_key, request_key, keyctl = calls
    program = [
        (BPF_LD_W_ABS, 0, 0, 4),
        (BPF_JMP_JEQ_K, 0, 4, arch),  # another ABI: allow
        (BPF_LD_W_ABS, 0, 0, 0),
        (BPF_JMP_JEQ_K, 3, 0, add_key),
        (BPF_JMP_JEQ_K, 2, 0, request_key),
        (BPF_JMP_JEQ_K, 1, 0, keyctl),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | err),
    ]
    filters = (_Filter * len(program))(*(_Filter(*ins) for ins in program))
    prog = _Prog(len(program), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
