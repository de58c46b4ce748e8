# Type stub of the CPython extension kmskeys/_hitpath.c.

from typing import TypeVar

_K = TypeVar("_K")

def fetch(
    desc: bytes, callout: bytes | None, dest: int, /
) -> tuple[int, bytes] | tuple[int, None, int, int]: ...
def read_recent(serial: int, /) -> bytes | None: ...
def read(serial: int, /) -> bytes | tuple[int, int]: ...

# The description of a valid name or a reference of a common shape; None for anything else.
def describe(ref: object, prefix: object, /) -> bytes | None: ...

# Key.request as a classmethod of kmskeys.Key; arguments that are not bytes (or an int
# destination) go to kmskeys/_request.py, which converts them and calls again.
def key_request(
    cls: type[_K],
    description: object,
    callout_info: object = None,
    destination: object = None,
    type: object = b"user",
    /,
) -> _K: ...

BUILD_STAMP: str
