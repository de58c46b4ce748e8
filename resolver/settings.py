"""Settings declared once: a component's table is a frozen dataclass whose fields carry all of it.

Each field is one setting: its TOML key (or keys), its type and default, its validator
(resolver/validators.py), the line of docs/resolver.md that explains it and the note install's
template gives it. From the tables come the Config dataclass (resolver/config.py composes
them), its validation, the template (resolver/config_text.py) and the docs table
(scripts/generate.py; a unit test holds the docs to the tables). The components are the
resolver core, the AWS gateway, the per-uid limits and the host cache (here), and each
backend, which owns its table (resolver/spec_kms.py, resolver/spec_stored.py).

Nothing here is heavy: the handler loads it for every miss.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from kmskeys import contract
from resolver.validators import (
    MAX_CONCURRENT,
    MAX_DEADLINE,
    MAX_NEGATIVE_TTL,
    MAX_TTL,
    MAX_TTL_JITTER,
    PROGRAM_KEYS,
    Check,
    NameRule,
    abs_path,
    boolean,
    choice,
    count,
    daemon_wait,
    deadline,
    duration,
    fraction,
    name_rules,
    rate,
    regions,
    seconds,
    text,
    url,
)

META = "kmskeys.setting"

DEFAULT_SYSLOG_SOCKET = Path("/dev/log")
DEFAULT_STATE_DIR = Path(contract.DEFAULT_STATE_DIR)
FACILITIES = {"authpriv": 10, "daemon": 3, "auth": 4, "user": 1}
PARTITIONS = ("aws", "aws-cn", "aws-us-gov")
MAX_HOST_CACHE_KEYS = 1_000_000  # kernel.keys.root_maxkeys' default
MAX_HOST_CACHE_BYTES = 1 << 30


# The settings tables are loaded on every miss, and making a dataclass costs a few hundred
# microseconds: a table is a dataclass with only what Config needs generated (frozen, no
# __init__, __repr__ or __eq__ of its own), and the small records here are plain classes.


class Meta:
    """What a field declares beyond its type and default: its validator `check`, the docs
    table's `meaning`, the template's `note`, the docs' default cell when not the default
    itself (`shown`), its TOML `keys` when not (only) the field's name, the template's
    `examples` (one per key, for a default of none); for a per-name policy table the keys its
    sections take (`rule_keys`) and the setting holding the prefix it governs."""

    __slots__ = (
        "check",
        "examples",
        "keys",
        "meaning",
        "note",
        "prefix_setting",
        "rule_keys",
        "shown",
    )

    def __init__(
        self,
        check: Check,
        meaning: str,
        *,
        note: str = "",
        shown: str | None = None,
        keys: tuple[str, ...] = (),
        examples: tuple[str, ...] = (),
        rule_keys: tuple[str, ...] = (),
        prefix_setting: str = "",
    ) -> None:
        self.check, self.meaning, self.note, self.shown = check, meaning, note, shown
        self.keys, self.examples = keys, examples
        self.rule_keys, self.prefix_setting = rule_keys, prefix_setting


def setting(
    default: object,
    check: Check,
    meaning: str,
    *,
    note: str = "",
    shown: str | None = None,
    keys: tuple[str, ...] = (),
    examples: tuple[str, ...] = (),
) -> Any:
    """A dataclass field that is one setting of the config file."""
    meta = Meta(check, meaning, note=note, shown=shown, keys=keys, examples=examples)
    return field(default=default, metadata={META: meta})


def policy(
    meaning: str,
    prefix_setting: str,
    rule_keys: tuple[str, ...],
    example: str,
    *,
    keys: tuple[str, ...] = (),
) -> Any:
    """A dataclass field that is a per-name policy table, `[TABLE."GLOB"]` sections, for the
    names under the prefix that the setting `prefix_setting` holds; `keys` names the table when
    the field's name cannot (`[pass."GLOB"]`: `pass` is a Python keyword). Every table also
    takes the program keys (`allow_units`, `allow_cgroups`, `allow_exe`: resolver/binding.py),
    which the pipeline applies whatever the backend."""
    rule_keys = tuple(dict.fromkeys((*rule_keys, *PROGRAM_KEYS)))

    def check(value: object, where: str) -> tuple[NameRule, ...]:
        return name_rules(value, where, rule_keys)

    meta = Meta(
        check,
        meaning,
        shown="none",
        keys=keys,
        examples=(example,),
        rule_keys=rule_keys,
        prefix_setting=prefix_setting,
    )
    return field(default=(), metadata={META: meta})


def declared(settings: type) -> list[tuple[Field[Any], Meta]]:
    """The fields of a settings class that are settings, in declaration order."""
    return [(f, f.metadata[META]) for f in fields(settings) if META in f.metadata]


def toml_keys(f: Field[Any], meta: Meta) -> tuple[str, ...]:
    """The TOML keys (or table name) a field is set with."""
    return meta.keys or (f.name,)


class Component:
    """One table: a title for the docs and the template, and its settings class."""

    __slots__ = ("settings", "title")

    def __init__(self, title: str, settings: type) -> None:
        self.title = title
        self.settings = settings


# --- The components that are not backends ----------------------------------------------------


@dataclass(frozen=True, init=False, repr=False, eq=False)
class CoreSettings:
    """The resolver core: how long answers live, how long a miss may take, where lines go."""

    ttl: int = setting(
        300,
        seconds(1, MAX_TTL),
        "seconds a resolved key stays cached (1 s to 366 days)",
        note="seconds a resolved secret stays cached",
    )
    negative_ttl: int = setting(
        10,
        seconds(1, MAX_NEGATIVE_TTL),
        "seconds (1 to 3600) a refusal (`EKEYREJECTED`) or unknown name (`ENOKEY`) stays "
        "cached; `EAGAIN` is rejected with it too but never served from the cache (the kernel "
        "facts above). Keep it, and `ttl`, well above the time a handler takes to exit: a key "
        "that expires before request-key exits is `ENOKEY` to the requester that started the "
        "upcall (docs/reliability.md, fact 7)",
        note="seconds a refusal or unknown name stays cached",
    )
    deadline: float = setting(
        8.0,
        deadline,
        "seconds (0.5 to 60) the whole handler may take, AWS calls included",
        note="seconds the handler may take, AWS calls included",
    )
    ttl_jitter: float = setting(
        0.1,
        fraction(MAX_TTL_JITTER),
        "each key's timeout is `ttl` x a random factor in [1 - j, 1 + j], in whole seconds "
        "(0 to 0.5)",
        note="key timeout = ttl +- 10 %, in whole seconds",
    )
    syslog_socket: Path = setting(
        DEFAULT_SYSLOG_SOCKET,
        abs_path,
        "unix datagram socket of the syslog daemon; when nothing listens there, each line goes "
        "to `/dev/kmsg` instead (dmesg, `journalctl -k`), saying so, and to stderr only if that "
        "fails too",
    )
    syslog_facility: str = setting(
        "authpriv",
        choice(tuple(FACILITIES)),
        "`authpriv`, `daemon`, `auth` or `user`",
        note="authpriv, auth, daemon or user",
    )


@dataclass(frozen=True, init=False, repr=False, eq=False)
class AwsSettings:
    """The AWS gateway (resolver/gateway.py): where every call to AWS goes, with which
    credentials. Never the environment, never ~/.aws/config."""

    region_list: tuple[str, ...] = setting(
        (),
        regions,
        "`region`: the one region clients are built for, required for legacy blobs (which carry "
        "no ARN). `regions`: instead, a list; with several, a multi-Region key falls back to the "
        "next one (below). Default: the regions of `key_arns`",
        shown="the regions of `key_arns`",
        keys=("region", "regions"),
        examples=('"eu-west-1"', '["eu-west-1", "eu-central-1"]'),
        note="default: the regions of key_arns",
    )
    endpoint_url: str | None = setting(
        None,
        url,
        "`http(s)://` URL of KMS or a compatible endpoint",
        shown="AWS default",
        examples=('"https://kms.eu-west-1.amazonaws.com"',),
        note="off EC2, or a VPC endpoint",
    )
    profile: str | None = setting(
        None,
        text,
        "profile in `shared_credentials_file`",
        shown="`default`",
        examples=('"default"',),
        note="a profile of shared_credentials_file",
    )
    shared_credentials_file: Path | None = setting(
        None,
        abs_path,
        "absolute path; root-owned, readable by nobody else (0600). Without it, credentials come "
        "from the instance role (IMDS). `~/.aws/config` is never read",
        examples=('"/etc/kmskeys/credentials"',),
        note="root-only (0600); off EC2",
    )


@dataclass(frozen=True, init=False, repr=False, eq=False)
class LimitSettings:
    """Per-uid limits (resolver/limits.py), checked before any expensive work."""

    max_concurrent_per_uid: int = setting(
        4,
        count(1, MAX_CONCURRENT),
        "handler runs at once per requesting uid (1 to 1000); the rest are answered `EAGAIN` at "
        "once, by `kmskeys-gate` before Python starts (re-run install after changing it)",
        note="handler runs per requesting uid; the rest get EAGAIN",
    )
    kms_rate_per_uid: float = setting(
        10.0,
        rate,
        "AWS calls per second per uid (token bucket refill): KMS Decrypt, the keystore seal's "
        "Encrypt and Decrypt, GetSecretValue, GetParameter, retries included, and each new "
        "`stored:` keystore entry; prefetch has a bucket of its own",
        note="AWS calls per second per uid (token bucket) ...",
    )
    kms_burst_per_uid: int = setting(
        100,
        count(1, MAX_CONCURRENT * 100),
        "tokens the per-uid bucket holds",
        note="... holding this many tokens",
    )
    state_dir: Path = setting(
        DEFAULT_STATE_DIR,
        abs_path,
        "root-only directory of the per-uid limits' lock files",
        note="root-only: the per-uid limits' lock files",
    )
    aggregate_subuids: bool = setting(
        True,
        boolean,
        "charge a uid inside a subordinate range of `/etc/subuid` (`owner:start:count`, rootless "
        "containers) to the range's owner: every per-uid limit above (kmskeys-gate's slots too), "
        "the host cache's and refresh-ahead's are then the owner's, shared by the whole range. "
        "`/etc/subuid` must be root-owned and not writable by group or others, else nothing is "
        "aggregated (logged). Re-run install after changing it",
        note="a /etc/subuid range spends its owner's per-uid limits",
    )


@dataclass(frozen=True, init=False, repr=False, eq=False)
class DaemonSettings:
    """The resolver daemon (`kmskeys-resolver serve`, resolver/daemon.py): misses answered
    without starting Python."""

    warm_socket: Path | None = setting(
        None,
        abs_path,
        "absolute path of the resolver daemon's socket (`kmskeys-resolver serve`), in a "
        "root-owned directory nobody else may write; `kmskeys-gate` hands it each miss. Unset, "
        "every miss starts the handler (re-run install after changing it)",
        examples=('"/run/kmskeys/resolver.sock"',),
        note="kmskeys-resolver serve: misses without a Python start",
    )
    daemon_wait: float = setting(
        0.5,
        daemon_wait,
        "seconds (0.01 to 5) `kmskeys-gate` waits for the daemon to **accept** a request (not "
        "to answer it: a KMS call takes what the deadline allows) before it runs the handler "
        "instead (re-run install after changing it)",
        note="the daemon must accept a miss within this, else the handler runs",
    )


@dataclass(frozen=True, init=False, repr=False, eq=False)
class HostCacheSettings:
    """The host cache (resolver/hostcache.py): one Decrypt per host and blob."""

    host_cache: bool = setting(
        True,
        boolean,
        "keep each decrypted secret once per host, in a root-only kernel keyring (below)",
        note="one Decrypt per host and blob, kept in root's kernel keyring",
    )
    stale_grace: int = setting(
        3600,
        seconds(0, MAX_TTL),
        "seconds (0 to 366 days) a host-cache entry may answer, counted from its decrypt, while "
        "KMS is **unavailable** (EAGAIN class only); `0` never serves stale",
        note="KMS down: serve a host-cache entry this old (0: never)",
    )
    stale_ttl: int = setting(
        30,
        seconds(1, MAX_NEGATIVE_TTL),
        "key timeout (1 to 3600 s) of a stale answer, so that KMS is asked again soon",
        note="... with this key timeout, so that KMS is retried soon",
    )
    stale_wait: float = setting(
        1.0,
        duration(0.0, MAX_DEADLINE),
        "seconds (0 to 60) a miss that has a stale host-cache entry at hand waits for KMS before "
        "it is answered stale; the refresh then goes on in the background and fills the host "
        'cache when KMS answers (below, "Stale without the stall")',
        note="KMS slow: answer stale after this long, refresh in the background",
    )
    host_cache_keys_per_uid: int = setting(
        200,
        count(1, MAX_HOST_CACHE_KEYS),
        "host-cache entries a requesting uid may have made at once (uid 0 is not counted); past "
        "it, answers are given but not kept",
        note="host-cache entries charged to one uid ...",
    )
    host_cache_bytes_per_uid: int = setting(
        1 << 20,
        count(1, MAX_HOST_CACHE_BYTES),
        "bytes (description and payload, as the kernel's quota counts them) of those entries",
        note="... and their bytes",
    )
    host_cache_root_share: float = setting(
        0.5,
        fraction(1.0),
        "the host cache never keeps an entry that would take root's kernel key quota "
        "(`/proc/key-users`, uid 0) past this share of `root_maxkeys` or `root_maxbytes`",
        note="never fill root's key quota past this share",
    )
    refresh_ahead: bool = setting(
        True,
        boolean,
        "remember each key answered, so that `kmskeys-resolver refresh` renews it in place "
        'before it expires (below, "Refresh-ahead")',
        note="remember answered keys for kmskeys-resolver refresh",
    )
    refresh_keys_per_uid: int = setting(
        200,
        count(1, MAX_HOST_CACHE_KEYS),
        "keys remembered for refresh-ahead per uid; past it, a uid's further keys expire as "
        "without refresh-ahead",
        note="keys remembered per uid",
    )
