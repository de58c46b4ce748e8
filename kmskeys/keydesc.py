"""`KeyDescription`: what keyctl_describe says about a key. Loaded by the first describe(), not
by `import kmskeys`: a class costs import time, and most processes never describe a key."""

from __future__ import annotations


class KeyDescription(tuple[str, int, int, int, str]):
    """What `keyctl describe` says about a key (type, uid, gid, perm, description); no payload."""

    # A plain tuple subclass rather than typing.NamedTuple: `typing` costs milliseconds to import.
    __slots__ = ()

    def __new__(cls, type_: str, uid: int, gid: int, perm: int, desc: str) -> KeyDescription:
        return super().__new__(cls, (type_, uid, gid, perm, desc))

    type = property(lambda self: self[0], doc="key type, e.g. 'user'")
    uid = property(lambda self: self[1], doc="owner uid")
    gid = property(lambda self: self[2], doc="group gid")
    perm = property(lambda self: self[3], doc="permission mask")
    description = property(lambda self: self[4], doc="key description, e.g. 'kms:NAME'")

    def __repr__(self) -> str:
        return "KeyDescription(type={!r}, uid={}, gid={}, perm={:#010x}, description={!r})".format(
            *self
        )
