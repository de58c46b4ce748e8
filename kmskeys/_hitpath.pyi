# Type stub of the CPython extension kmskeys/_hitpath.c.

def fetch(
    desc: bytes, callout: bytes | None, dest: int, /
) -> tuple[int, bytes] | tuple[int, None, int, int]: ...
def read_recent(serial: int, /) -> bytes | None: ...

# TypeError for a type, description or callout that is not bytes (the caller converts a str).
def request(
    type_: str | bytes, desc: str | bytes, callout: str | bytes | None, dest: int, /
) -> int | tuple[int, None, int, int]: ...
def read(serial: int, /) -> bytes | tuple[int, int]: ...
def key_request(
    cls: type,
    description: object,
    callout_info: object = None,
    destination: object = None,
    type: object = b"user",
    /,
) -> object: ...

BUILD_STAMP: str
