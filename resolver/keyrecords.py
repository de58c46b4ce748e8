"""The keys the resolver answered, remembered so that refresh-ahead can renew them in place.

After it instantiates a key, the handler records it (`remember`): the key's serial, its owner
(%u), the requester's %g, the description and callout it was asked with, the timeout it got and
when. `kmskeys-resolver refresh` (resolver/refresh.py) reads the records and, before each key
expires, resolves the same request again on the owner's behalf and updates the key in place.

Root-only state, never a secret: `state_dir/refresh/UID/SERIAL`, one small file per key, in a
0700 directory per charged uid (limits.charged_uid), at most `refresh_keys_per_uid` of them per
directory: a uid that makes many keys fills its own directory, nobody else's. A callout is a
blob (ciphertext) or a key size, never a plaintext. The files live on the tmpfs /run by
default, like the keys themselves they do not survive a reboot: they are written without fsync.

Light on purpose: the handler imports this on every miss.
"""

from __future__ import annotations

import os
import struct
from contextlib import suppress
from typing import TYPE_CHECKING

from kmskeys import fileio
from kmskeys.contract import ADMIN_GROUP_PERM, DESCRIPTION_MAX, PERM_SETATTR, PERM_WRITE
from kmskeys.contract import GROUP_SHIFT as _GROUP_SHIFT
from kmskeys.contract import POSSESSOR_SHIFT as _POSSESSOR_SHIFT
from resolver.errors import ConfigError
from resolver.limits import charged_uid

if TYPE_CHECKING:
    from resolver.config import Config
    from resolver.outcome import Outcome
    from resolver.pipeline import KernelRequest

RECORDS_DIR = "refresh"
_VERSION = 1
# version, owner uid, requester gid, timeout, answered at (CLOCK_BOOTTIME), lengths.
_HEAD = struct.Struct("=BIIId HH")
# A key refresh-ahead can renew carries the admin group's WRITE|SETATTR (contract.py).
RENEWABLE = (PERM_WRITE | PERM_SETATTR) << _GROUP_SHIFT
assert ADMIN_GROUP_PERM & RENEWABLE == RENEWABLE


class Record:
    """One answered key, as `remember` wrote it."""

    __slots__ = ("answered", "callout", "charged", "description", "gid", "serial", "timeout", "uid")

    def __init__(
        self,
        serial: int,
        *,
        uid: int,
        gid: int,
        description: str,
        callout: bytes,
        timeout: int,
        answered: float,
        charged: int = -1,
    ) -> None:
        self.serial, self.uid, self.gid = serial, uid, gid
        self.description, self.callout = description, callout
        self.timeout, self.answered, self.charged = timeout, answered, charged

    def __repr__(self) -> str:  # never the callout
        return f"Record({self.serial}, {self.description!r}, uid={self.uid})"

    def encode(self) -> bytes:
        """The record file's bytes."""
        desc = self.description.encode()
        head = _HEAD.pack(
            _VERSION, self.uid, self.gid, self.timeout, self.answered, len(desc), len(self.callout)
        )
        return head + desc + self.callout

    @classmethod
    def decode(cls, serial: int, charged: int, data: bytes) -> Record | None:
        """The record in `data`, or None if it is not one (garbled, or another version)."""
        if len(data) < _HEAD.size:
            return None
        version, uid, gid, timeout, answered, desc_len, callout_len = _HEAD.unpack_from(data)
        if version != _VERSION or len(data) != _HEAD.size + desc_len + callout_len:
            return None
        try:
            desc = data[_HEAD.size : _HEAD.size + desc_len].decode()
        except UnicodeDecodeError:
            return None
        callout = data[_HEAD.size + desc_len :]
        return cls(
            serial,
            uid=uid,
            gid=gid,
            description=desc,
            callout=callout,
            timeout=timeout,
            answered=answered,
            charged=charged,
        )


def remember(config: Config, asked: KernelRequest, outcome: Outcome, answered: float) -> str | None:
    """Record the key `outcome` answered for `asked` at `answered` (CLOCK_BOOTTIME); why not,
    or None. Never raises for a state problem: refresh-ahead is an optimisation."""
    if not config.refresh_ahead or not outcome.answered:
        return "refresh_ahead is off" if not config.refresh_ahead else "not answered"
    if outcome.perm >> _POSSESSOR_SHIFT:
        # Bound to a program (PROGRAM_KEY_PERM): each resolution identifies its requester.
        return "program-bound keys are not renewed"
    if outcome.perm & RENEWABLE != RENEWABLE:
        return "the key cannot be renewed (no kmskeys-admin group, or it has members)"
    if asked.description.partition(":")[0] == config.pass_prefix:
        # The user's own password store, read through the user's gpg-agent: renewing it would
        # keep using (and so keep alive) an unlock the user may have walked away from.
        return "pass: entries are not renewed"
    record = Record(
        outcome.key,
        uid=outcome.uid,
        gid=asked.gid,
        description=asked.description,
        callout=asked.callout,
        timeout=outcome.timeout,
        answered=answered,
    )
    try:
        charged = charged_uid(config, outcome.uid)
        dir_fd = uid_dir(config, charged, create=True)
        assert dir_fd is not None
        try:
            if len(_serials(dir_fd)) >= config.refresh_keys_per_uid:
                return f"uid {charged} has refresh_keys_per_uid {config.refresh_keys_per_uid} keys"
            name = str(outcome.key)
            with suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)  # a dead key's record under a reused serial
            # Not fsync'd (two fsyncs, ~9 ms of a miss on a disk): a record is worth nothing
            # after a reboot, which takes its key away; one a crash garbled decodes to None.
            fileio.write_new(dir_fd, name, record.encode(), durable=False)
        finally:
            os.close(dir_fd)
    except (ConfigError, fileio.UntrustedFileError, OSError) as exc:
        return f"not recorded: {exc}"
    return None


def uid_dir(config: Config, charged: int, create: bool = False) -> int | None:
    """An fd of `state_dir/refresh/CHARGED`, created root-only if asked; None if missing."""
    flags = fileio.PRIVATE | (fileio.CREATE if create else 0)
    top = records_dir(config, create)
    if top is None:
        return None
    try:
        return fileio.open_dir(str(charged), f"refresh records of uid {charged}", flags, dir_fd=top)
    except fileio.UntrustedFileError as exc:
        if exc.problem == fileio.MISSING:
            return None
        raise
    finally:
        os.close(top)


def records_dir(config: Config, create: bool = False) -> int | None:
    """An fd of `state_dir/refresh`, created root-only if asked; None if missing."""
    flags = fileio.PRIVATE | (fileio.CREATE if create else 0)
    state = fileio.open_dir(config.state_dir, f"state_dir {config.state_dir}", flags)
    try:
        return fileio.open_dir(RECORDS_DIR, "refresh records", flags, dir_fd=state)
    except fileio.UntrustedFileError as exc:
        if exc.problem == fileio.MISSING:
            return None
        raise
    finally:
        os.close(state)


def _serials(dir_fd: int) -> list[int]:
    return [int(name) for name in os.listdir(dir_fd) if name.isdigit()]


def load(config: Config, charged: int, serial: int) -> Record | None:
    """The record of `serial` in `charged`'s directory, or None (gone, or not a record)."""
    dir_fd = uid_dir(config, charged)
    if dir_fd is None:
        return None
    try:
        limit = _HEAD.size + DESCRIPTION_MAX + 4096
        data = fileio.read_file(str(serial), limit, f"refresh record {serial}", dir_fd=dir_fd)
    except (fileio.UntrustedFileError, OSError):
        return None
    finally:
        os.close(dir_fd)
    return Record.decode(serial, charged, data)


def listing(config: Config) -> dict[int, list[int]]:
    """Charged uid -> the serials recorded in its directory."""
    top = records_dir(config)
    if top is None:
        return {}
    found: dict[int, list[int]] = {}
    try:
        for name in os.listdir(top):
            if not name.isdigit():
                continue
            dir_fd = uid_dir(config, int(name))
            if dir_fd is None:
                continue
            try:
                found[int(name)] = _serials(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        os.close(top)
    return found


def forget(config: Config, charged: int, serial: int) -> None:
    """Remove the record of `serial`, if it is there."""
    dir_fd = uid_dir(config, charged)
    if dir_fd is None:
        return
    try:
        with suppress(FileNotFoundError):
            os.unlink(str(serial), dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
