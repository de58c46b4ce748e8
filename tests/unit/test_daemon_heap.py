"""The resolver daemon's warm-up heap (resolver/daemon.py settle_heap): frozen out of later
garbage collections, with its garbage collected first; what comes after is collected as ever.

Each check runs in a forked child: freezing the test runner's own heap would change it for
every test after this one."""

from __future__ import annotations

import gc
import json
import os
import weakref
from collections.abc import Callable

import pytest

from resolver.daemon import settle_heap

pytestmark = pytest.mark.unit


class _Node:
    """A container the collector tracks, and that a weakref can watch."""

    def __init__(self) -> None:
        self.other: object = None


def _in_child(func: Callable[[], object]) -> object:
    """func()'s JSON result, computed in a forked child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(func()).encode())
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the child failed"
    return json.loads(data)


def _cycle() -> weakref.ref[_Node]:
    """A reference cycle nothing else holds: only the collector frees it."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def _settled() -> dict[str, object]:
    kept = _Node()  # alive through settle_heap: frozen
    garbage = _cycle()  # garbage already: collected, never frozen
    settle_heap()
    later = _cycle()  # made after: collected as ever
    tracked = {id(obj) for obj in gc.get_objects()}
    gc.collect()
    return {
        "frozen": gc.get_freeze_count(),
        "kept_scanned": id(kept) in tracked,
        "garbage_freed": garbage() is None,
        "later_freed": later() is None,
    }


def test_the_warm_up_heap_leaves_later_collections() -> None:
    result = _in_child(_settled)
    assert result == {
        "frozen": result["frozen"],
        "kept_scanned": False,
        "garbage_freed": True,
        "later_freed": True,
    }
    assert isinstance(result["frozen"], int) and result["frozen"] > 1000
