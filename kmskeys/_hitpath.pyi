# Type stub of the CPython extension kmskeys/_hitpath.c.

def fetch(
    desc: bytes, callout: bytes | None, dest: int, /
) -> tuple[int, bytes] | tuple[int, None, int, int]: ...
def read_recent(serial: int, /) -> bytes | None: ...

BUILD_STAMP: str
