"""One error root, one class per errno, each telling the user what to do."""

from __future__ import annotations

import errno
import inspect

import pytest

import kmskeys
from kmskeys import errors

pytestmark = pytest.mark.unit

CLASSES = [
    obj
    for _, obj in inspect.getmembers(errors, inspect.isclass)
    if issubclass(obj, errors.KmsKeysError)
]


def test_every_class_is_exported_and_documented() -> None:
    assert len(CLASSES) >= 14
    for cls in CLASSES:
        assert cls.__doc__ and cls.__doc__.strip(), cls
        assert getattr(kmskeys, cls.__name__) is cls


@pytest.mark.parametrize(
    ("err", "cls", "builtin"),
    [
        (errno.ENOKEY, errors.KeyNotFoundError, LookupError),
        (errno.EACCES, errors.KeyPermissionError, PermissionError),
        (errno.EPERM, errors.OperationNotPermittedError, PermissionError),
        (errno.EINVAL, errors.InvalidArgumentError, ValueError),
        (errno.ENOMEM, errors.OutOfMemoryError, MemoryError),
        (errno.EKEYREJECTED, errors.KeyRejectedError, OSError),
        (errno.EAGAIN, errors.TemporarilyUnavailableError, OSError),
        (errno.EDQUOT, errors.QuotaExceededError, OSError),
        (errno.EKEYEXPIRED, errors.KeyExpiredError, OSError),
        (errno.EKEYREVOKED, errors.KeyRevokedError, OSError),
        (errno.ENODEV, errors.KeyTypeUnavailableError, OSError),
    ],
)
def test_errno_maps_to_one_class(err: int, cls: type, builtin: type) -> None:
    exc = errors.error_for_errno(err, "request_key kms:x")
    assert type(exc) is cls
    assert isinstance(exc, builtin)
    assert isinstance(exc, errors.KmsKeysError)
    assert exc.errno == err
    assert str(exc).startswith("request_key kms:x: ")


def test_unknown_errno_keeps_its_number() -> None:
    exc = errors.error_for_errno(errno.EBADF, "keyctl_read")
    assert type(exc) is errors.KeyctlError
    assert exc.errno == errno.EBADF


def test_resolver_classes_point_to_the_log_only_after_an_upcall() -> None:
    for err in (errno.ENOKEY, errno.EKEYREJECTED, errno.EAGAIN):
        assert "journalctl -t kmskeys-resolver" in str(
            errors.error_for_errno(err, "r", upcall=True)
        )
        assert "journalctl" not in str(errors.error_for_errno(err, "r"))


def test_quota_message_points_to_doctor() -> None:
    assert "kmskeys doctor" in str(errors.error_for_errno(errno.EDQUOT, "add_key"))


def test_unknown_attribute_still_raises() -> None:
    with pytest.raises(AttributeError):
        kmskeys.NoSuchThing  # noqa: B018
