"""PKCS#11 primitives: unwrap with a key that never leaves a token (a YubiKey PIV slot, a smart
card, an HSM; SoftHSM2 in the tests).

The token holds an RSA key pair (2048..4096 bits). Sealing needs only its public half, read
without a PIN (`public_key`), and happens in software (kmskeys.tokenblob). Opening asks the token
to decrypt the wrapped data key (CKM_RSA_PKCS_OAEP, SHA-1, MGF1-SHA-1, no label): the one
private operation, after one login.

The PIN is never retried, so the token is never locked by the resolver:

- before logging in, the token's flags are read: a locked PIN (CKF_USER_PIN_LOCKED), the last
  try left (CKF_USER_PIN_FINAL_TRY) or a failed attempt since the last successful login
  (CKF_USER_PIN_COUNT_LOW) refuse without a C_Login. A wrong PIN file therefore costs the token
  one try in total, not one per request: a person must log in once by hand (which resets the
  flag) after fixing the file;
- one C_Login; CKR_PIN_INCORRECT is refused at once (EKEYREJECTED), never looped.

The PIN comes from a root-only file (`pin_file`) or a systemd credential (`pin_credential`, read
from the resolver's own $CREDENTIALS_DIRECTORY), never from argv or the requester's environment;
it is never in a message. A module that cannot be loaded, a token not present and a device error
are EAGAIN (the kernel never caches it; a stale value may answer where configured); a wrong PIN,
a missing or substituted key and a blob for another key are refusals.

`token_call` is the token's gateway, as resolver/gateway.py is AWS's: every private operation
goes through it, spending the requester's budget first (a token is one device shared by every
uid; a YubiKey takes tens to hundreds of milliseconds per RSA decryption), timing it, and
classifying every failure once (`_classify`).

python-pkcs11 is imported only here, lazily: no other path of the resolver loads it.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar

from kmskeys.tokenblob import (
    ALG_RSA_OAEP_SHA1_AES256GCM,
    TokenBlob,
    TokenEnvelope,
    key_id,
    open_blob,
    open_entry,
)
from resolver.errors import ConfigError, RefusedError, ServiceUnavailableError

if TYPE_CHECKING:
    from resolver.backend import Budget, Timings
    from resolver.config import Config

T = TypeVar("T")
MAX_PIN = 256
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
# CK_TOKEN_INFO flags (PKCS#11 v2.40, pkcs11t.h).
CKF_USER_PIN_COUNT_LOW = 0x00010000
CKF_USER_PIN_FINAL_TRY = 0x00020000
CKF_USER_PIN_LOCKED = 0x00040000
CKF_USER_PIN_TO_BE_CHANGED = 0x00080000

_PIN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


class TokenUnavailableError(ServiceUnavailableError):
    """The token cannot be reached (EAGAIN): module, reader or token absent, or a device error;
    insert the token or fix `token_module`, then ask again. Like an AWS outage, it is the one
    class a stale host-cache entry may answer for."""


class TokenRefusedError(RefusedError):
    """The token refused (EKEYREJECTED): no such key, a substituted key, or a blob for another."""

    alarm = True


class TokenPinError(TokenRefusedError):
    """The token refused the PIN or its PIN state forbids trying (EKEYREJECTED): fix the PIN
    file, then log in once by hand (e.g. `pkcs11-tool --login --test`), which resets the token's
    failed-attempt flag; kmskeys never tries again on its own."""


class TokenSettings:
    """Which token and key, and where the PIN is: the part of root's config a token seal owns."""

    __slots__ = ("key_id", "key_label", "module", "pin_credential", "pin_file", "token_label")

    def __init__(
        self,
        module: str,
        token_label: str,
        key_label: str,
        *,
        pin_file: str | None = None,
        pin_credential: str | None = None,
        key_id: bytes | None = None,
    ) -> None:
        if (pin_file is None) == (pin_credential is None):
            raise RefusedError("a token needs exactly one of pin_file and pin_credential")
        if not os.path.isabs(module):
            raise RefusedError("the PKCS#11 module must be an absolute path")
        self.module, self.token_label, self.key_label = module, token_label, key_label
        self.pin_file, self.pin_credential, self.key_id = pin_file, pin_credential, key_id

    def __repr__(self) -> str:
        pin = f"pin_file={self.pin_file!r}" if self.pin_file else "pin_credential"
        return f"TokenSettings({self.module!r}, {self.token_label!r}, {self.key_label!r}, {pin})"


def read_pin(settings: TokenSettings, environ: Mapping[str, str] | None = None) -> bytearray:
    """The PIN, from a root-only file or the resolver's own systemd credential.

    The file must be a regular file (no link), owned by root, and neither readable nor writable
    by group or others; one trailing newline is dropped. `environ` is the resolver's own
    environment (a service's $CREDENTIALS_DIRECTORY), never the requester's.
    """
    if settings.pin_credential is not None:
        directory = (os.environ if environ is None else environ).get(CREDENTIALS_ENV)
        name = settings.pin_credential
        if not directory or "/" in name or name in ("", ".", ".."):
            raise TokenPinError(
                f"pin_credential {name!r}: no ${CREDENTIALS_ENV} (LoadCredential= in the unit)"
            )
        path = os.path.join(directory, name)
    else:
        path = str(settings.pin_file)
    try:
        fd = os.open(path, _PIN_FLAGS)
    except OSError as exc:
        reason = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise TokenPinError(f"the token PIN file {path}: {reason}") from None
    try:
        return _read_pin_fd(fd, path)
    finally:
        os.close(fd)


def _read_pin_fd(fd: int, path: str) -> bytearray:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise TokenPinError(f"the token PIN file {path} is not a regular file")
    if st.st_uid != 0:
        raise TokenPinError(f"the token PIN file {path} is owned by uid {st.st_uid}, not root")
    if st.st_mode & 0o077:
        raise TokenPinError(
            f"the token PIN file {path} is open to group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod 0600 it"
        )
    pin = bytearray(os.read(fd, MAX_PIN + 2))
    if pin.endswith(b"\n"):
        del pin[-1:]
    if not pin or len(pin) > MAX_PIN or os.read(fd, 1):
        pin[:] = bytes(len(pin))
        raise TokenPinError(f"the token PIN file {path} is empty or too long")
    return pin


class TokenSession:
    """One logged-in session on the configured token: `with TokenSession(settings) as token:`."""

    def __init__(self, settings: TokenSettings, environ: Mapping[str, str] | None = None):
        self.settings = settings
        self.environ = environ
        self._session: Any = None
        self._private: Any = None
        self.key_id = b""

    def __enter__(self) -> TokenSession:
        token = _find_token(self.settings)
        spki = _public_spki(token, self.settings)
        self.key_id = key_id(spki)
        if self.settings.key_id is not None and self.key_id != self.settings.key_id:
            raise TokenRefusedError(
                f"the key {self.settings.key_label!r} on token {self.settings.token_label!r} is "
                "not the configured one (key_id differs): was the token replaced?"
            )
        _check_pin_state(token, self.settings)
        self._session = _login(token, self.settings, read_pin(self.settings, self.environ))
        try:
            self._private = _private_key(self._session, self.settings)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Log out and close the session (errors of a token gone meanwhile are moot)."""
        session, self._session, self._private = self._session, None, None
        if session is not None:
            # A token removed meanwhile has nothing left to close.
            with suppress(Exception):
                session.close()

    def unwrap(self, envelope: TokenEnvelope) -> bytearray:
        """The data key inside `envelope`, decrypted by the token."""
        if envelope.alg != ALG_RSA_OAEP_SHA1_AES256GCM:
            raise TokenRefusedError(f"unsupported token algorithm {envelope.alg}")
        if envelope.key_id != self.key_id:
            raise TokenRefusedError(
                "this was sealed for another token key (key_id differs from the configured key)"
            )
        from pkcs11 import MGF, Mechanism

        try:
            data_key = self._private.decrypt(
                envelope.wrapped,
                mechanism=Mechanism.RSA_PKCS_OAEP,
                mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None),
            )
        except Exception as exc:
            raise _classify(exc, "decrypt", self.settings) from None
        return bytearray(data_key)

    def open_blob(self, blob: TokenBlob, name: str, user: str | None) -> bytes:
        """The secret of a `kmsp2:` blob requested as `name` by `user` (from the request)."""
        from kmskeys.blob import BlobFormatError

        try:
            # A blob made for another name or user costs the token nothing.
            blob.check_request(name, user)
        except BlobFormatError as exc:
            raise TokenRefusedError(exc.reason) from None
        return self._opened(blob.envelope, lambda key: open_blob(blob, bytes(key), name, user))

    def open_entry(self, envelope: TokenEnvelope, context: Mapping[str, str]) -> bytes:
        """A keystore key sealed with `seal = "pkcs11"` under `context`."""
        return self._opened(envelope, lambda key: open_entry(envelope, bytes(key), context))

    def _opened(self, envelope: TokenEnvelope, opener: Any) -> bytes:
        from kmskeys.blob import BlobFormatError

        data_key = self.unwrap(envelope)
        try:
            plain: bytes = opener(data_key)
            return plain
        except BlobFormatError as exc:
            raise TokenRefusedError(exc.reason) from None
        finally:
            data_key[:] = bytes(len(data_key))


def public_key(settings: TokenSettings) -> bytes:
    """The token key's SubjectPublicKeyInfo (DER), read without a PIN: what sealing needs."""
    return _public_spki(_find_token(settings), settings)


def settings_from(config: Config) -> TokenSettings:
    """The token the config names (resolver/spec_token.py), or ConfigError if none is."""
    if config.token_module is None or config.token_label is None or not config.token_key_label:
        raise ConfigError(f"config {config.path}: no token is configured (token_module...)")
    pin_file = None if config.token_pin_file is None else str(config.token_pin_file)
    key_id = None if config.token_key_id is None else bytes.fromhex(config.token_key_id)
    return TokenSettings(
        str(config.token_module),
        config.token_label,
        config.token_key_label,
        pin_file=pin_file,
        pin_credential=config.token_pin_credential,
        key_id=key_id,
    )


def token_call(
    settings: TokenSettings,
    budget: Budget,
    timings: Timings,
    action: Callable[[TokenSession], T],
    phase: str = "token",
) -> T:
    """`action` on a logged-in session: the requester's budget spent first (a caller over its
    rate never touches the token), the time recorded as `phase`, failures classified."""
    budget.spend()
    start = time.perf_counter()
    try:
        with TokenSession(settings) as token:
            return action(token)
    finally:
        timings.add(phase, (time.perf_counter() - start) * 1000)


# --- the token, step by step; every PKCS#11 error classified once -----------------------------


def _classify(exc: BaseException, step: str, settings: TokenSettings) -> Exception:
    """The resolver's class for a python-pkcs11 error `exc` raised at `step`."""
    from pkcs11 import exceptions as p11

    where = f"token {settings.token_label!r} ({step})"
    gone = (p11.DeviceRemoved, p11.TokenNotPresent, p11.TokenNotRecognised, p11.DeviceError,
            p11.SessionHandleInvalid, p11.SessionClosed, p11.SlotIDInvalid, p11.DeviceMemory,
            p11.HostMemory, p11.FunctionFailed, p11.NoSuchToken, p11.FunctionCancelled)  # fmt: skip
    # CKR_GENERAL_ERROR: at the decryption, what a token answers to a wrapped key it cannot
    # unwrap (SoftHSM2); anywhere else, a device in trouble, not a refusal to cache.
    if isinstance(exc, gone) or (isinstance(exc, p11.GeneralError) and step != "decrypt"):
        return TokenUnavailableError(f"{where}: the token is not reachable ({type(exc).__name__})")
    if isinstance(exc, p11.PinIncorrect):
        return TokenPinError(
            f"{where}: the token refused the PIN from "
            f"{settings.pin_file or 'the credential ' + str(settings.pin_credential)}; kmskeys "
            "will not try again until someone logs in by hand once"
        )
    if isinstance(exc, p11.PinLocked | p11.PinExpired | p11.PinInvalid | p11.PinLenRange):
        return TokenPinError(
            f"{where}: the token's PIN state refuses a login ({type(exc).__name__})"
        )
    if isinstance(exc, p11.NoSuchKey | p11.MultipleObjectsReturned):
        return TokenRefusedError(
            f"{where}: no single key labelled {settings.key_label!r} ({type(exc).__name__})"
        )
    if isinstance(exc, p11.EncryptedDataInvalid | p11.EncryptedDataLenRange | p11.GeneralError):
        return TokenRefusedError(f"{where}: the token could not unwrap the data key")
    return TokenRefusedError(f"{where}: {type(exc).__name__}")


def _find_token(settings: TokenSettings) -> Any:
    try:
        import pkcs11
    except ImportError:
        raise TokenUnavailableError("python-pkcs11 is not installed (the `token` extra)") from None
    if not os.path.exists(settings.module):
        raise TokenUnavailableError(f"the PKCS#11 module {settings.module} does not exist")
    try:
        lib = pkcs11.lib(settings.module)
    except Exception:
        raise TokenUnavailableError(
            f"the PKCS#11 module {settings.module} cannot be loaded"
        ) from None
    try:
        return lib.get_token(token_label=settings.token_label)
    except Exception as exc:
        raise _classify(exc, "find the token", settings) from None


def _public_spki(token: Any, settings: TokenSettings) -> bytes:
    from pkcs11 import Attribute, KeyType, ObjectClass

    try:
        with token.open() as session:
            public = session.get_key(
                object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.RSA, label=settings.key_label
            )
            modulus, exponent = public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT]
    except Exception as exc:
        raise _classify(exc, "read the public key", settings) from None
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    numbers = RSAPublicNumbers(int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big"))
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_pin_state(token: Any, settings: TokenSettings) -> None:
    try:
        flags = int(token.flags)
    except Exception as exc:
        raise _classify(exc, "read the token's flags", settings) from None
    for flag, state in (
        (CKF_USER_PIN_LOCKED, "its user PIN is locked"),
        (CKF_USER_PIN_FINAL_TRY, "one PIN try is left"),
        (CKF_USER_PIN_COUNT_LOW, "a wrong PIN was entered since the last successful login"),
        (CKF_USER_PIN_TO_BE_CHANGED, "its PIN must be changed first"),
    ):
        if flags & flag:
            raise TokenPinError(
                f"token {settings.token_label!r}: {state}; kmskeys does not log in (it could "
                "lock the token): fix the PIN file and log in once by hand"
            )


def _login(token: Any, settings: TokenSettings, pin: bytearray) -> Any:
    try:
        # One C_Login, never repeated. PKCS#11 PINs are UTF-8 and python-pkcs11 takes a str: an
        # immutable copy that lives until it is collected; the bytearray is wiped at once.
        text = pin.decode("utf-8")
    except UnicodeDecodeError:
        pin[:] = bytes(len(pin))
        raise TokenPinError(f"the PIN for token {settings.token_label!r} is not UTF-8") from None
    try:
        return token.open(user_pin=text)
    except Exception as exc:
        raise _classify(exc, "login", settings) from None
    finally:
        pin[:] = bytes(len(pin))


def _private_key(session: Any, settings: TokenSettings) -> Any:
    from pkcs11 import KeyType, ObjectClass

    try:
        return session.get_key(
            object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.RSA, label=settings.key_label
        )
    except Exception as exc:
        raise _classify(exc, "find the private key", settings) from None


__all__ = [
    "TokenPinError",
    "TokenRefusedError",
    "TokenSession",
    "TokenSettings",
    "TokenUnavailableError",
    "public_key",
    "read_pin",
    "settings_from",
    "token_call",
]
