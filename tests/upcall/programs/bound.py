"""What the program-binding tests share: the policy that binds names to app.service, the secret,
and the steps a requester child runs (ask for a name, sit in a unit)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kmskeys import get_secret
from tests.support import cgroups
from tests.support.names import unique
from tests.support.requester import Steps
from tests.upcall.harness import Install

SECRET = b"kmst-db-password"
# Names under these globs are bound: to app.service, and (unit-bound blobs aside) nothing else.
POLICY = (
    '\n[names."kmst-*-pbapp-*"]\nallow_units = ["app.service"]\n'
    '\n[names."kmst-*-pbcg-*"]\nallow_cgroups = ["/kmstest-*.slice/app.service"]\n'
)


def named_secret(install: Install, stem: str = "pbapp") -> str:
    """A fresh name under STEM's policy, its blob deployed."""
    made = unique(stem)
    install.deploy(made, install.blob(SECRET, made))
    return made


def asking(install: Install, name: str, **options: object) -> Callable[[], object]:
    """In the requester: get_secret of NAME, decoded."""

    def step() -> object:
        return get_secret(name, prefix=install.prefix, **options).decode()  # type: ignore[arg-type]

    return step


@contextmanager
def in_unit(
    cg: cgroups.Slice,
    unit: str,
    user: int,
    mode: str,
    steps: list[Callable[[], object]],
    *,
    session: str = "new",
) -> Iterator[Steps]:
    """A Steps child as `user`, moved into `unit` (a cgroup path, or a unit of the slice)."""
    with Steps(user, steps, mode=mode, session=session) as child:  # type: ignore[arg-type]
        assert child.ready() == {"ok": None}
        cg.move(child.pid, unit if unit.startswith("/") else cg.path(unit))
        yield child
