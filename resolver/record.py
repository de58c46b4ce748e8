"""Record: a small value class for the identification's facts (resolver/requester.py, task.py,
programpolicy.py).

Equality, hash and repr come from its __slots__. Not a dataclass or NamedTuple, whose creation
costs each miss that imports the module a few hundred microseconds.
"""

from __future__ import annotations


class Record:
    """A value: equality, hash and repr from its __slots__."""

    __slots__: tuple[str, ...] = ()

    def fields(self) -> tuple[object, ...]:
        """The values, in __slots__ order."""
        return tuple(getattr(self, name) for name in self.__slots__)

    def as_dict(self) -> dict[str, object]:
        """The values by name."""
        return dict(zip(self.__slots__, self.fields(), strict=True))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.fields() == self.fields()

    def __hash__(self) -> int:
        return hash(self.fields())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.as_dict().items())
        return f"{type(self).__name__}({shown})"
