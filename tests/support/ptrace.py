"""Start a program stopped right after its execve, and let it go: a test can change the world
between a program's start and its first instruction (replace its file, say).

PTRACE_TRACEME in the child before execve: the kernel stops it with SIGTRAP once the new
program is loaded, and the parent (its tracer) resumes it with PTRACE_DETACH.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Sequence

PTRACE_TRACEME = 0
PTRACE_DETACH = 17
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)


def _trace_me() -> None:
    if _libc.ptrace(PTRACE_TRACEME, 0, None, None) == -1:
        raise OSError(ctypes.get_errno(), "ptrace(PTRACE_TRACEME)")


def start_stopped(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start `argv`, stopped after its execve (the new program loaded, nothing run yet)."""
    process = subprocess.Popen(
        list(argv),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_trace_me,  # noqa: PLW1509 (ptrace must be asked for by the child itself)
    )
    _, status = os.waitpid(process.pid, 0)
    if not os.WIFSTOPPED(status):
        raise RuntimeError(f"{argv[0]} did not stop after exec (status {status:#x})")
    return process


def resume(pid: int) -> None:
    """Let a program start_stopped() stopped run on, untraced."""
    if _libc.ptrace(PTRACE_DETACH, pid, None, None) == -1:
        raise OSError(ctypes.get_errno(), "ptrace(PTRACE_DETACH)")
