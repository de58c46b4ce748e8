"""The facts the client, the encryptor and the resolver share: each defined once, here.

Limits, file suffixes, where the request-key rules live, the permission mask of a resolved key,
and how an AWS error code is classified. `encryptor/` and `resolver/` import these; so do the
client's cold paths, never `import kmskeys` or a cached get_secret: the facts those need, the
description prefixes and the build stamp, are the package's own (kmskeys/__init__.py), re-exported
here.
The kernel or AWS fact each value rests on is its comment; docs/design.md explains the whole.
"""

from __future__ import annotations

import errno as _errno

# Re-exported (the `as` tells mypy so): defined by kmskeys/__init__.py, which the hot path reads.
from kmskeys import BUILD_STAMP as BUILD_STAMP  # noqa: PLC0414
from kmskeys import DEFAULT_PASS_PREFIX as DEFAULT_PASS_PREFIX  # noqa: PLC0414
from kmskeys import DEFAULT_PREFIX as DEFAULT_PREFIX  # noqa: PLC0414
from kmskeys import DEFAULT_SM_PREFIX as DEFAULT_SM_PREFIX  # noqa: PLC0414
from kmskeys import DEFAULT_SSM_PREFIX as DEFAULT_SSM_PREFIX  # noqa: PLC0414
from kmskeys import DEFAULT_STORED_PREFIX as DEFAULT_STORED_PREFIX  # noqa: PLC0414
from kmskeys import DEFAULT_TOKEN_PREFIX as DEFAULT_TOKEN_PREFIX  # noqa: PLC0414

# --- Kernel limits ---------------------------------------------------------------------------
# The `user` and `logon` key types hold 1 to 32767 bytes: 0 and 32768 are EINVAL
# (security/keys/user_defined.c: datalen <= 0 || datalen > 32767).
USER_PAYLOAD_MAX = 32767
# request_key(2) copies the callout info with strndup_user(.., PAGE_SIZE): at most 4095 bytes.
CALLOUT_MAX = 4095
# A key description is at most 4095 bytes too; ours are far shorter (names are <= 200 bytes).
DESCRIPTION_MAX = 4095

# --- The build ----------------------------------------------------------------------------------
# BUILD_STAMP (generated into kmskeys/__init__.py, imported above) is compiled into every compiled
# part (the hit-path extension, the cffi module, kmskeys-gate) from kmskeys/contract.h; each is
# checked against it at import or run, so a part built from other sources never loads silently.

# --- AWS KMS limits --------------------------------------------------------------------------
# KMS Encrypt takes at most 4096 bytes of plaintext; larger secrets go in envelope mode.
KMS_PLAINTEXT_MAX = 4096

# --- Files and rules -------------------------------------------------------------------------
# A blob deployed for NAME lives at blob_dir/NAME + BLOB_SUFFIX.
BLOB_SUFFIX = ".kms"
REQUEST_KEY = "/sbin/request-key"
# request-key(8) reads every *.conf file here (keyutils >= 1.5.11), first match wins.
REQUEST_KEY_D = "/etc/request-key.d"
DEFAULT_CONFIG = "/etc/kmskeys/resolver.toml"
DEFAULT_BLOB_DIR = "/etc/kmskeys/secrets"
# The description namespace of KMS-backed secrets, `kms:NAME`, is DEFAULT_PREFIX (imported above).
# The keystore of `stored:` keys lives here (root-owned, 0700; docs/dpapi.md).
DEFAULT_KEYSTORE_DIR = "/var/lib/kmskeys"
# The resolver's root-only state (per-uid slots, host-cache locks, refresh records, the flush
# epoch: kmskeys/flushepoch.py), a tmpfs by default.
DEFAULT_STATE_DIR = "/run/kmskeys"
# The description namespaces of the other backends (DEFAULT_STORED_PREFIX, DEFAULT_PASS_PREFIX,
# DEFAULT_TOKEN_PREFIX, DEFAULT_SM_PREFIX, DEFAULT_SSM_PREFIX) are imported above, with the
# default one: a client that names `sm:prod/db#password` reads them without this module.


# The program install's rule runs first, built from resolver/gate.c into the resolver package:
# it takes the requester's per-uid slot before any Python starts (docs/resolver.md).
GATE_PROGRAM = "kmskeys-gate"


def rule_file_name(prefix: str) -> str:
    """The request-key.d file install writes for `prefix`: kmskeys.conf, or kmskeys-P.conf."""
    return "kmskeys.conf" if prefix == DEFAULT_PREFIX else f"kmskeys-{prefix}.conf"


# --- Key permissions (keyctl(1) PERMISSIONS; include/uapi/linux/keyctl.h) ---------------------
# Four groups of six bits: possessor, owner uid, group, other. For a caller that possesses the
# key (found it by searching its own keyrings), the possessor bits are ORed onto the bits of
# whichever of owner/group/other applies: possessor bits ADD to the owner's.
PERM_VIEW, PERM_READ, PERM_WRITE, PERM_SEARCH, PERM_LINK, PERM_SETATTR = 1, 2, 4, 8, 16, 32
POSSESSOR_SHIFT, USER_SHIFT, GROUP_SHIFT, OTHER_SHIFT = 24, 16, 8, 0

# A key the resolver instantiates answers to its owner uid alone:
# - owner VIEW: describe() (the client's ownership check), /proc/keys (`kmskeys show`);
# - owner READ: the payload;
# - owner SEARCH: request_key(2) finds the cached key in the owner's keyrings, and
#   keyctl_invalidate (`kmskeys flush`) needs it;
# - owner LINK: request_key(2) links a key it finds into an explicit destination keyring only
#   with LINK (get_secret's keyring="user"/"persistent"); the owner can read the key anyway.
# Possessors get nothing: any process that shares the keyring (a joined session keyring,
# `su`/`runuser` inheriting one) possesses the key, and keyctl_read succeeds on a possessed key
# even without READ; possession comes from a search, so possessors must not have SEARCH (nor
# LINK, which would let them link it into a keyring they search). No WRITE or SETATTR for the
# owner or possessors, so no process can update or re-time the cached secret; only root, through
# the member-less admin group below (ADMIN_GROUP_PERM), renews it.
RESOLVED_KEY_PERM = (PERM_VIEW | PERM_READ | PERM_SEARCH | PERM_LINK) << USER_SHIFT

# --- Host-wide administration (root's `kmskeys flush`, `kmskeys-resolver refresh`) -------------
# /proc/keys lists only keys the reader may VIEW, keyctl_invalidate needs SEARCH, KEYCTL_UPDATE
# needs WRITE and KEYCTL_SET_TIMEOUT needs SETATTR; the kernel grants root no override for any
# of them (key_task_permission checks the bits alone). So the resolver gives every key it
# instantiates the group ADMIN_GROUP (created by install, with NO members) and these group bits:
# - VIEW|SEARCH: root's flush lists and invalidates every uid's keys (kmskeys/hostflush.py);
# - WRITE|SETATTR: refresh-ahead (resolver/refresh.py) renews a key in place, KEYCTL_UPDATE then
#   KEYCTL_SET_TIMEOUT, so the serial stays and no reader ever meets a gap;
# never READ or LINK: root's flush and refresh read no key and link none anywhere. Root takes the
# gid as its fsgid (one thread, for the moment it acts). The kernel picks ONE set of bits, the
# first that applies: the owner's when fsuid == the key's uid, else the group's when the fsgid
# or a supplementary group matches, else other's (possessor bits add to it). So root acting on
# a key uid 0 owns takes a non-zero fsuid as well, or the owner's bits (no WRITE) apply.
# The group must stay empty: group SEARCH lets a member who possesses a keyring holding the key
# find it, finding it is possessing it, and a possessor may read a key without READ; group WRITE
# would let a member overwrite the cached secret. Nobody but root's flush and refresh threads
# ever has this gid, so RESOLVED_KEY_PERM's reasoning is unchanged for every other process
# (checked on 6.18: with the gid as fsgid, update and set_timeout succeed; without these bits,
# or with fsuid equal to the owner's, both fail with EACCES).
ADMIN_GROUP = "kmskeys-admin"
ADMIN_GROUP_PERM = (PERM_VIEW | PERM_SEARCH | PERM_WRITE | PERM_SETATTR) << GROUP_SHIFT
# What the resolver sets on a host that has the admin group (install creates it); without the
# group, RESOLVED_KEY_PERM alone and the requester's gid.
ADMIN_KEY_PERM = RESOLVED_KEY_PERM | ADMIN_GROUP_PERM

# --- Keys bound to a program (docs/security.md, "Secrets bound to a program") -----------------
# A name whose policy binds it to programs (allow_units, allow_cgroups, allow_exe) or a blob bound
# to a unit answers to its requester's keyring, not to its uid: other programs of the same uid
# must neither find nor read it. Permissions cannot say "this uid AND this keyring", so the owner
# gets nothing and the possessor everything the hit path needs:
# - possessor VIEW: describe() (the client's owner check: the key is still chowned to the uid);
# - possessor READ and SEARCH: request_key(2) finds the key in the requester's keyrings, which
#   makes it possessed, and reads it; keyctl_invalidate (`kmskeys flush` in that session) too;
# - no LINK, for anyone: request_key(2) links a found key into an explicit destination only with
#   LINK, so even the requester cannot put it in a keyring the rest of its uid searches (its user
#   or persistent keyring); the resolver links it only into the requester's own thread, process
#   or session keyring (resolver/binding.py);
# - no owner bits: another process of the uid that does not possess the key (another session)
#   cannot describe, read, search or link it, by serial or by name (EACCES; request_key: ENOKEY).
# Possession is not tied to a uid: every process sharing the requester's keyring possesses the
# key, so the resolver requires that keyring to be owned by the requester's uid (never a session
# keyring inherited through su/runuser from another user) and not shared by the whole uid.
PROGRAM_KEY_PERM = (PERM_VIEW | PERM_READ | PERM_SEARCH) << POSSESSOR_SHIFT
# With the admin group, root's flush finds and invalidates it as any other key (group VIEW and
# SEARCH for a group nobody is in, never READ or LINK), and nothing more: no WRITE or SETATTR,
# so refresh-ahead never renews it in place. Renewing resolves the request again, and a
# program-bound request can only be resolved for a requester identified while it waits: the key
# expires, and its next request identifies anew.
PROGRAM_ADMIN_KEY_PERM = PROGRAM_KEY_PERM | (PERM_VIEW | PERM_SEARCH) << GROUP_SHIFT

# request_key(2)'s destination keyring as the holder of the request's authority sees it
# (include/uapi/linux/keyctl.h: "requestor's dest keyring"; possessed, so describable).
KEY_SPEC_REQUESTOR_KEYRING = -8
# The fsuid and fsgid /proc/keys is read with to find a request's authorization key: (uid_t)-2,
# mapped in the initial user namespace and owning no keys, so the reader sees the authorization
# key it possesses and keys that grant others VIEW, not every key root may view.
PROC_KEYS_READER_ID = 0xFFFFFFFE
# At most this many /proc/keys lines may start with the authorization key's serial (the kernel's
# own line, and copies a key description forges): more is answered EAGAIN, unexamined. A line
# longer than AUTH_LINE_MAX bytes is not the kernel's (its own is under 100).
AUTH_LINES_MAX = 8
AUTH_LINE_MAX = 255

# systemd unit types whose cgroup holds processes (a slice only holds other cgroups): a unit
# read from a cgroup path, named in allow_units or bound into a blob ends in one of these.
UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")
# systemd's unit name alphabet (src/basic/unit-name.c) and length (UNIT_NAME_MAX - 1).
UNIT_NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:-_.\\@"
UNIT_NAME_MAX = 255

# --- Negative keys (a cached refusal) --------------------------------------------------------
# A key the resolver rejects gets the same owner bits and no possessor bits either. The kernel's
# default mask for a key request_key(2) creates gives possessors everything (VIEW READ WRITE
# SEARCH LINK SETATTR), and with WRITE a co-possessor's add_key of the same description updates
# the negative key, which positively instantiates it: a payload of its choosing in a key the
# requester owns. The kernel's default is also how the client tells a failed upcall (the kernel
# negated the key for 60 s because no resolver answered) from the resolver's answer: only the
# resolver clears the possessor bits (kmskeys/cached.py).
NEGATIVE_KEY_PERM = RESOLVED_KEY_PERM
# With the admin group, root's flush may also set its expiry (SETATTR): a negative key cannot
# be invalidated (every lookup but unlink's and setattr's returns its rejection errno), and an
# expired one is skipped by request_key's search. SETATTR on a key that holds no payload and can
# never be instantiated again grants nothing else.
ADMIN_NEGATIVE_KEY_PERM = NEGATIVE_KEY_PERM | (
    (PERM_VIEW | PERM_SEARCH | PERM_SETATTR) << GROUP_SHIFT
)
# The possessor bits of a mask: the kernel's default for a key request_key(2) creates has them
# all, a refusal the resolver answers none (a program-bound answer some: PROGRAM_KEY_PERM).
POSSESSOR_MASK = 0x3F << POSSESSOR_SHIFT
# Every mask the resolver gives a key it answers: how `kmskeys flush --everything` knows them.
RESOLVER_KEY_PERMS = frozenset(
    (
        RESOLVED_KEY_PERM,
        ADMIN_KEY_PERM,
        PROGRAM_KEY_PERM,
        PROGRAM_ADMIN_KEY_PERM,
        NEGATIVE_KEY_PERM,
        ADMIN_NEGATIVE_KEY_PERM,
    )
)

# --- The host cache (resolver/hostcache.py) ---------------------------------------------------
# The resolver keeps each decrypted secret once per host, in a keyring of this description
# linked from root's persistent keyring (KEYCTL_GET_PERSISTENT; only uid 0, or CAP_SETUID, can
# reach uid 0's). Its entries are `user` keys described HOSTCACHE_ENTRY_PREFIX + PREFIX:NAME:...
# (hostcache_entry), a namespace no request matches. Kernel memory only: nothing on disk.
HOSTCACHE_KEYRING = "kmskeys-hostcache"
HOSTCACHE_ENTRY_PREFIX = "kmskeys-hc:"
# Possessors (root processes that linked root's persistent keyring) may read, update, search,
# re-time and invalidate entries; the owner (uid 0) views them. Group and other: nothing. No LINK:
# an entry is never linked anywhere else, so it never reaches a requester's keyring.
HOSTCACHE_PERM = (
    (PERM_VIEW | PERM_READ | PERM_WRITE | PERM_SEARCH | PERM_SETATTR) << POSSESSOR_SHIFT
) | (PERM_VIEW << USER_SHIFT)
# The keyring itself: possessors may add, search, list and clear it; nobody else anything.
HOSTCACHE_KEYRING_PERM = (
    (PERM_VIEW | PERM_READ | PERM_WRITE | PERM_SEARCH | PERM_SETATTR) << POSSESSOR_SHIFT
) | (PERM_VIEW << USER_SHIFT)


def hostcache_entry(
    prefix: str, name: str, user: str | None = None, digest: str = "", unit: str | None = None
) -> str:
    """The host-cache description of NAME's blob with this digest (and user, if user-bound, and
    unit, if unit-bound: `:u=USER:s=UNIT`, unambiguous since a user name holds no ':').

    With the defaults, the common head of every entry for PREFIX:NAME (what flush matches):
    names cannot hold ':' (kmskeys/names.py), so `kms:a:` never matches an entry of `kms:a:b`.
    """
    head = f"{HOSTCACHE_ENTRY_PREFIX}{prefix}:{name}:"
    if not digest:
        return head
    return (
        f"{head}{digest}"
        + ("" if user is None else f":u={user}")
        + ("" if unit is None else f":s={unit}")
    )


# --- What the resolver answers ----------------------------------------------------------------
# Every failure is rejected with exactly one of three errnos, one per class; the client maps
# each to one exception class (kmskeys.errors). EAGAIN is special in the kernel: a key rejected
# with it is never found by a later search (-EAGAIN means "not found" there), so it is not
# cached, although the handler rejects it with negative_ttl too; the other two are cached for
# the config's negative_ttl.
ERRNO_UNKNOWN_SECRET = _errno.ENOKEY  # no blob for this name
ERRNO_REFUSED = _errno.EKEYREJECTED  # policy, binding, expiry, invalid blob, KMS refusal
ERRNO_UNAVAILABLE = _errno.EAGAIN  # KMS unreachable, throttled, past the deadline

# --- AWS error codes -------------------------------------------------------------------------
# One classification of KMS/STS error codes, for the build side (exit codes) and the resolver
# (errno classes). A code not listed is a refusal; HTTP 5xx and 429 count as AWS_TRANSIENT.
AWS_THROTTLED = "throttled"  # slow down and retry
AWS_TRANSIENT = "transient"  # KMS or a dependency failed this once: retry
AWS_EXPIRED_CREDENTIALS = "expired-credentials"  # fresh credentials will come (instance role)
AWS_BAD_CREDENTIALS = "bad-credentials"  # these credentials are not accepted at all
AWS_ACCESS_DENIED = "access-denied"  # the caller may not use this key
AWS_KEY_STATE = "key-state"  # the key is disabled, pending deletion, missing or of the wrong kind
AWS_INVALID_CIPHERTEXT = "invalid-ciphertext"  # not this key's ciphertext, or the context differs
AWS_REFUSED = "refused"  # any other answer

AWS_ERROR_CLASSES: dict[str, str] = {
    "ThrottlingException": AWS_THROTTLED,
    "Throttling": AWS_THROTTLED,
    "ThrottledException": AWS_THROTTLED,
    "TooManyRequestsException": AWS_THROTTLED,
    "RequestLimitExceeded": AWS_THROTTLED,
    "LimitExceededException": AWS_THROTTLED,
    "DependencyTimeoutException": AWS_TRANSIENT,
    "KMSInternalException": AWS_TRANSIENT,
    # "The request was rejected because the specified KMS key was not available. You can retry."
    "KeyUnavailableException": AWS_TRANSIENT,
    "ServiceUnavailable": AWS_TRANSIENT,
    "InternalFailure": AWS_TRANSIENT,
    "RequestTimeout": AWS_TRANSIENT,
    "RequestTimeoutException": AWS_TRANSIENT,
    "ExpiredTokenException": AWS_EXPIRED_CREDENTIALS,
    "ExpiredToken": AWS_EXPIRED_CREDENTIALS,
    "UnrecognizedClientException": AWS_BAD_CREDENTIALS,
    "InvalidSignatureException": AWS_BAD_CREDENTIALS,
    "InvalidClientTokenId": AWS_BAD_CREDENTIALS,
    "IncompleteSignature": AWS_BAD_CREDENTIALS,
    "MissingAuthenticationToken": AWS_BAD_CREDENTIALS,
    "AccessDeniedException": AWS_ACCESS_DENIED,
    "AccessDenied": AWS_ACCESS_DENIED,
    "NotFoundException": AWS_KEY_STATE,
    "DisabledException": AWS_KEY_STATE,
    "KMSInvalidStateException": AWS_KEY_STATE,
    "InvalidKeyUsageException": AWS_KEY_STATE,
    "InvalidCiphertextException": AWS_INVALID_CIPHERTEXT,
    "IncorrectKeyException": AWS_INVALID_CIPHERTEXT,
}


def classify_aws_error(code: str, status: int = 0) -> str:
    """The class of an AWS error `code` answered with HTTP `status` (0 when unknown)."""
    found = AWS_ERROR_CLASSES.get(code)
    if found is not None:
        return found
    return AWS_TRANSIENT if status >= 500 or status == 429 else AWS_REFUSED


# Failures that never reached an AWS answer (botocore raised them), and two kinds of answer that
# carry no usable error code.
AWS_UNREADABLE = "unreadable"  # an error answer whose body names no code (botocore: the status)
AWS_NO_REGION = "no-region"
AWS_NO_CREDENTIALS = "no-credentials"  # none found, or the instance role's fetch failed
AWS_CREDENTIALS_CONFIG = "credentials-config"  # a profile missing, a key without its secret
AWS_TIMEOUT = "timeout"  # connect or read timed out
AWS_UNREACHABLE = "unreachable"  # no connection, or it closed mid-answer
AWS_INVALID_REQUEST = "invalid-request"  # botocore refused to send the parameters
AWS_FAILED = "failed"  # any other botocore failure
AWS_MALFORMED = "malformed"  # not botocore's: its parser choked on a garbled answer
# Classes worth another attempt within the same deadline.
AWS_RETRYABLE = frozenset((AWS_THROTTLED, AWS_TRANSIENT, AWS_EXPIRED_CREDENTIALS, AWS_UNREACHABLE))
# botocore's exception classes, matched by name (kmskeys never imports botocore), first match
# wins; a subclass is matched through its MRO (ReadTimeoutError is an HTTPClientError too).
_BOTOCORE_CLASSES = (
    ("NoRegionError", AWS_NO_REGION),
    ("NoCredentialsError", AWS_NO_CREDENTIALS),
    ("CredentialRetrievalError", AWS_NO_CREDENTIALS),
    ("ProfileNotFound", AWS_CREDENTIALS_CONFIG),
    ("PartialCredentialsError", AWS_CREDENTIALS_CONFIG),
    ("ConnectTimeoutError", AWS_TIMEOUT),
    ("ReadTimeoutError", AWS_TIMEOUT),
    ("EndpointConnectionError", AWS_UNREACHABLE),
    ("ProxyConnectionError", AWS_UNREACHABLE),
    ("ConnectionClosedError", AWS_UNREACHABLE),
    ("HTTPClientError", AWS_UNREACHABLE),
    ("ParamValidationError", AWS_INVALID_REQUEST),
    ("BotoCoreError", AWS_FAILED),
)


class AwsFailure:
    """One classified AWS failure: `kind` (an AWS_* class), the AWS error `code` (or botocore's
    exception name), the HTTP `status` (0: none), and AWS's `message` (the build side may show
    it; the resolver logs codes only)."""

    __slots__ = ("code", "kind", "message", "status")

    def __init__(self, kind: str, code: str, status: int = 0, message: str = "") -> None:
        self.kind, self.code, self.status, self.message = kind, code, status, message

    @property
    def retryable(self) -> bool:
        """Worth another attempt within the same deadline."""
        return self.kind in AWS_RETRYABLE

    def __repr__(self) -> str:
        return f"AwsFailure({self.kind!r}, {self.code!r}, {self.status})"


def classify_aws_exception(exc: BaseException) -> AwsFailure:
    """The class of a failed botocore call: the one classification the encryptor and the
    resolver share (each then maps the class to its own error: an exit code, an errno)."""
    response = getattr(exc, "response", None)
    mro = type(exc).__mro__
    if isinstance(response, dict) and any(c.__name__ == "ClientError" for c in mro):
        error = response.get("Error") or {}
        code = str(error.get("Code") or "")
        meta = response.get("ResponseMetadata") or {}
        status = int(meta.get("HTTPStatusCode") or 0)
        message = str(error.get("Message") or "")
        if not code or code.isdigit():
            # botocore names the error after the status when the body is unreadable: we do not
            # know what AWS said, so this is no refusal.
            return AwsFailure(AWS_UNREADABLE, code, status, message)
        return AwsFailure(classify_aws_error(code, status), code, status, message)
    names = {c.__name__ for c in mro if c.__module__.startswith("botocore")}
    for name, kind in _BOTOCORE_CLASSES:
        if name in names:
            return AwsFailure(kind, type(exc).__name__, 0, str(exc))
    return AwsFailure(AWS_MALFORMED, type(exc).__name__)
