"""resolver.binding: how every requester a forged /proc/keys can name is judged, where a bound
key may go, and what a name without a program policy costs (nothing).

The real upcall in real cgroups is tests/upcall/programs/test_program_binding.py; here each
rule meets the cases a requester could arrange.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kmskeys.contract import PROGRAM_ADMIN_KEY_PERM, PROGRAM_KEY_PERM
from resolver.backend import Budget, Context, Timings
from resolver.binding import Binding, check_destination, judge
from resolver.config import parse
from resolver.errors import IdentityError, IdentityUnclearError, RefusedError
from resolver.programpolicy import program_policy
from resolver.requester import AuthView
from resolver.settings import policy
from resolver.task import Requester
from resolver.validators import NameRule

pytestmark = pytest.mark.unit

APP = program_policy(allow_units=("app.service",))


def _who(tid: int, unit: str | None) -> Requester:
    cgroup = f"/system.slice/{unit or 'plain'}"
    return Requester(
        tid=tid,
        tgid=tid,
        uid=33,
        parents=(),
        cgroup=cgroup,
        trusted=cgroup,
        unit=unit,
        exe="/usr/sbin/app",
        exe_problem=None,
    )


def test_one_requester_passes_or_fails_on_its_own() -> None:
    assert judge(APP, (_who(1, "app.service"),)) == _who(1, "app.service")
    with pytest.raises(RefusedError, match=r"^program policy \(unit\): unit other.service is not"):
        judge(APP, (_who(1, "other.service"),))
    alone = IdentityError("cgroup: 2 cgroup2 lines, not one")
    with pytest.raises(IdentityError, match="2 cgroup2 lines") as raised:
        judge(APP, (alone,))
    assert raised.value is alone


def test_several_requesters_must_all_pass_to_be_admitted() -> None:
    """The kernel's own line is among them: all pass, so the real requester passes."""
    both = (_who(1, "app.service"), _who(2, "app.service"))
    assert judge(APP, both).tid == 1


def test_several_requesters_that_all_fail_are_refused() -> None:
    found = (_who(1, "other.service"), IdentityError("requester 2 has fsuid 0, its request 33"))
    with pytest.raises(RefusedError, match="and 1 other requesters a key description named"):
        judge(APP, found)


@pytest.mark.parametrize(
    "found",
    [
        (_who(1, "app.service"), _who(2, "other.service")),
        (_who(1, "other.service"), _who(2, "app.service")),
        (_who(1, "app.service"), IdentityError("requester 2: unreadable status")),
    ],
    ids=["allowed-first", "refused-first", "one-unclear"],
)
def test_requesters_judged_differently_are_unclear_never_refused(
    found: tuple[Requester | IdentityError, ...],
) -> None:
    """A forgery can neither admit (the real one may be refused) nor make a refusal stick
    (the real one may be admitted): EAGAIN, which the kernel never caches."""
    with pytest.raises(IdentityUnclearError, match="judges their requesters differently"):
        judge(APP, found)


def test_requesters_of_different_units_are_unclear_even_when_all_pass() -> None:
    """A unit-bound blob needs the one unit: KMS binds it."""
    either = program_policy(allow_units=("a.service", "b.service"))
    with pytest.raises(IdentityUnclearError, match="different units"):
        judge(either, (_who(1, "a.service"), _who(2, "b.service")))
    with pytest.raises(IdentityUnclearError, match="different units"):
        judge(None, (_who(1, "a.service"), _who(2, "b.service")))


# --- where the key goes --------------------------------------------------------------------------

THREAD, PROCESS, SESSION = 0, 0, 700
OWN = (THREAD, PROCESS, SESSION)


def _view(dest: int, described: str) -> AuthView:
    return AuthView(0x11794E12, (), dest, described)


@pytest.mark.parametrize(
    ("keyrings", "dest", "described"),
    [
        (OWN, SESSION, "keyring;33;33;3f030000;_ses"),
        ((800, 0, SESSION), 800, "keyring;33;33;3f010000;_tid"),
        ((0, 900, SESSION), 900, "keyring;33;33;3f010000;_pid"),
        (OWN, SESSION, "keyring;33;33;3f030000;app-session"),
    ],
    ids=["session", "thread", "process", "named-session"],
)
def test_the_requesters_own_keyrings_take_the_key(
    keyrings: tuple[int, int, int], dest: int, described: str
) -> None:
    check_destination(_view(dest, described), keyrings, 33)


@pytest.mark.parametrize(
    ("dest", "described", "why"),
    [
        (5, "keyring;33;33;3f080000;_uid.33", "is not the requester's own thread, process"),
        (6, "keyring;33;33;3f080000;_persistent.33", "is not the requester's own thread"),
        (0, "", "is not the requester's own thread"),
        (SESSION, "keyring;0;0;3f030000;_ses", "belongs to uid 0, not the requester's 33"),
        (SESSION, "user;33;33;3f010000;x", "belongs to uid 33"),
        (SESSION, "keyring;33;33;3f030000;_uid_ses.33", "has no session keyring"),
    ],
    ids=["user", "persistent", "none", "root-session", "not-a-keyring", "user-session"],
)
def test_a_keyring_others_may_search_refuses(dest: int, described: str, why: str) -> None:
    with pytest.raises(IdentityError, match=why):
        check_destination(_view(dest, described), OWN, 33)


def test_a_hostile_keyring_name_is_quoted_in_the_reason() -> None:
    with pytest.raises(IdentityError) as raised:
        check_destination(_view(5, 'keyring;33;33;3f080000;x"\nreason=ok'), OWN, 33)
    assert "\n" not in raised.value.reason and '"x\\x22\\x0areason=ok"' in raised.value.reason


# --- what the pipeline pays --------------------------------------------------------------------


class _NoBudget:
    def spend(self) -> None:
        raise AssertionError("no AWS call here")


@dataclass
class _Views:
    """A view source that counts how often it is asked (the /proc/keys read, in real life)."""

    asked: list[int] = field(default_factory=list)

    def __call__(self) -> AuthView:
        self.asked.append(1)
        raise IdentityError("gathered")


def _context() -> Context:
    budget: Budget = _NoBudget()
    return Context(0.0, budget)


def test_a_name_without_a_program_policy_reads_nothing_and_binds_nothing() -> None:
    views = _Views()
    for rule in (None, NameRule("app/*", ttl=5, allow_users=("www-data",))):
        binding = Binding(7, 33, OWN, views, rule)
        context = _context()
        binding.admit(context)
        binding.still_waiting()
        assert binding.perm(True) is None and context.timings.phases == {}
    assert views.asked == []


def test_a_name_with_a_program_policy_identifies_before_anything_else() -> None:
    views = _Views()
    binding = Binding(7, 33, OWN, views, NameRule("app/*", allow_units=("app.service",)))
    context = _context()
    with pytest.raises(IdentityError, match="gathered"):
        binding.admit(context)
    assert views.asked == [1] and "view" in context.timings.phases  # asked of its holder
    assert binding.perm(True) == PROGRAM_ADMIN_KEY_PERM and binding.perm(False) == PROGRAM_KEY_PERM


def test_a_unit_is_asked_for_once_and_binds_the_key() -> None:
    views = _Views()
    binding = Binding(7, 33, OWN, views, None)
    with pytest.raises(IdentityError, match="gathered"):
        binding.unit(_context())
    assert views.asked == [1] and binding.perm(False) == PROGRAM_KEY_PERM


# --- the config ---------------------------------------------------------------------------------

KEY = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def test_every_policy_table_takes_the_program_keys() -> None:
    config = parse(
        {
            "key_arns": [KEY],
            "names": {"db-*": {"allow_units": ["nginx.service"], "allow_users": ["www-data"]}},
            "stored": {"wm/*": {"allow_cgroups": ["/user.slice/**"], "scope": "user"}},
        }
    )
    rule = config.rule_for("db-password")
    assert rule is not None and rule.binds_programs and rule.allow_units == ("nginx.service",)
    stored = config.rule_for("wm/x", config.stored_prefix)
    assert stored is not None and stored.allow_cgroups == ("/user.slice/**",)


def test_a_backend_added_later_gets_the_program_keys_from_the_shared_table() -> None:
    """A new backend declares its table with `policy(...)` and its own keys: the program keys
    come with it, validated as everywhere (resolver/settings.py)."""
    table = policy("per-name policy of `new:` names", "new_prefix", ("ttl",), '[new."x"]')
    meta = table.metadata["kmskeys.setting"]
    assert meta.rule_keys == ("ttl", "allow_units", "allow_cgroups", "allow_exe")
    (rule,) = meta.check({"x": {"allow_exe": ["/usr/bin/app"]}}, "config: new")
    assert rule.allow_exe == ("/usr/bin/app",)
    with pytest.raises(RefusedError, match=r"new\.'x'\.allow_exe: 'app' must be an absolute path"):
        meta.check({"x": {"allow_exe": ["app"]}}, "config: new")


def test_timings_show_a_sub_millisecond_phase() -> None:
    timings = Timings()
    timings.add("identify", 0.42)
    assert str(timings) == "identify:0.4"


def test_the_resolvers_report_names_the_rules_that_bind_programs() -> None:
    """For doctor: which rules, in which tables, so that it can say what such a host needs."""
    from resolver.selfcheck import program_policies

    config = parse(
        {
            "key_arns": [KEY],
            "names": {"db-password": {"allow_units": ["nginx.service"]}, "other": {"ttl": 5}},
            "stored": {"wm/*": {"allow_cgroups": ["/user.slice/**"], "allow_exe": ["/usr/bin/x"]}},
        }
    )
    assert program_policies(config) == [
        {"table": "names", "glob": "db-password", "allow_units": ["nginx.service"]},
        {
            "table": "stored",
            "glob": "wm/*",
            "allow_cgroups": ["/user.slice/**"],
            "allow_exe": ["/usr/bin/x"],
        },
    ]
    assert program_policies(parse({"key_arns": [KEY]})) == []
