"""resolver.programpolicy: the grammar of allow_units / allow_cgroups / allow_exe, and matching."""

from __future__ import annotations

import pytest

from resolver.errors import ConfigError
from resolver.programpolicy import (
    ProgramPolicy,
    Refusal,
    cgroup_matches,
    parse_program_policy,
    refusal,
)
from resolver.requester import Requester

pytestmark = pytest.mark.unit

WHERE = 'config.toml: names."db-password"'


def _who(**changes: object) -> Requester:
    fields: dict[str, object] = {
        "tid": 812,
        "tgid": 812,
        "uid": 33,
        "parents": (1,),
        "cgroup": "/system.slice/nginx.service",
        "trusted": "/system.slice/nginx.service",
        "unit": "nginx.service",
        "exe": "/usr/sbin/nginx",
        "exe_problem": None,
    }
    fields.update(changes)
    return Requester(**fields)  # type: ignore[arg-type]


def test_a_section_without_program_keys_binds_nothing() -> None:
    policy = parse_program_policy({"ttl": 60, "allow_users": ["www-data"]}, WHERE)
    assert policy == ProgramPolicy() and not policy.binds
    assert refusal(policy, _who(unit=None, exe=None, exe_problem="unreadable")) is None


def test_the_three_keys_parse() -> None:
    policy = parse_program_policy(
        {
            "allow_units": ["nginx.service", "app-*.scope", "getty@tty[12].service"],
            "allow_cgroups": ["/system.slice/nginx.service", "/user.slice/**/session-*.scope"],
            "allow_exe": ["/usr/sbin/nginx"],
        },
        WHERE,
    )
    assert policy.binds
    assert policy.units == ("nginx.service", "app-*.scope", "getty@tty[12].service")
    assert policy.cgroups == ("/system.slice/nginx.service", "/user.slice/**/session-*.scope")
    assert policy.exes == ("/usr/sbin/nginx",)


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("allow_units", [], "non-empty list"),
        ("allow_units", "nginx.service", "non-empty list"),
        ("allow_units", [""], "not a non-empty string"),
        ("allow_units", [7], "not a non-empty string"),
        ("allow_units", ["nginx"], "literal unit suffix"),
        ("allow_units", ["nginx*"], "literal unit suffix"),
        ("allow_units", ["nginx.*"], "literal unit suffix"),
        ("allow_units", ["system.slice"], "match a slice with allow_cgroups"),
        ("allow_units", [".service"], "literal unit suffix"),
        ("allow_units", ["a/b.service"], "not a unit name or glob"),
        ("allow_units", ["a b.service"], "not a unit name or glob"),
        ("allow_units", ["a\nb.service"], "control character"),
        ("allow_units", ["x" * 300 + ".service"], "not a unit name or glob"),
        ("allow_cgroups", ["system.slice/a.service"], "absolute cgroup path glob"),
        ("allow_cgroups", ["/system.slice//a.service"], "empty, '.' or '..'"),
        ("allow_cgroups", ["/system.slice/../a.service"], "empty, '.' or '..'"),
        ("allow_cgroups", ["/system.slice/"], "empty, '.' or '..'"),
        ("allow_cgroups", ["/a/**x/b"], "whole path component"),
        ("allow_cgroups", ["/a\x7f"], "control character"),
        ("allow_exe", ["nginx"], "absolute path"),
        ("allow_exe", ["//usr/sbin/nginx"], "absolute path"),
        ("allow_exe", ["/usr/sbin/../bin/sh"], "not normalized"),
        ("allow_exe", ["/usr/sbin/nginx/"], "not normalized"),
        ("allow_exe", ["/usr/./sbin/nginx"], "not normalized"),
        ("allow_exe", ["/usr/sbin/*"], "exact paths, not globs"),
        ("allow_exe", ["/usr/sbin/nginx\t"], "control character"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(key: str, value: object, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as raised:
        parse_program_policy({key: value}, WHERE)
    assert str(raised.value).startswith(f"{WHERE}.{key}")


def test_a_unit_in_the_list_passes_and_another_is_refused_with_its_own_reason() -> None:
    policy = ProgramPolicy(units=("nginx.service", "app-*.scope"))
    assert refusal(policy, _who()) is None
    assert refusal(policy, _who(unit="app-web-12.scope")) is None
    assert refusal(policy, _who(unit="logshipper.service")) == Refusal(
        "unit", "unit logshipper.service is not in allow_units"
    )
    assert refusal(policy, _who(unit="NGINX.service")) is not None  # no case folding
    assert refusal(policy, _who(unit=None, cgroup="/", trusted="/")) == Refusal(
        "unit", "no systemd unit in cgroup /"
    )


def test_a_delegated_cgroup_is_shown_as_where_root_named_it() -> None:
    who = _who(
        unit="user@1000.service",
        cgroup="/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service",
        trusted="/user.slice/user-1000.slice/user@1000.service",
    )
    found = refusal(ProgramPolicy(units=("nginx.service",)), who)
    assert found == Refusal("unit", "unit user@1000.service is not in allow_units")
    found = refusal(ProgramPolicy(cgroups=("/**/nginx.service",)), who)
    assert found == Refusal(
        "cgroup",
        "cgroup /user.slice/user-1000.slice/user@1000.service (delegated; the requester is in "
        "/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service) "
        "is not in allow_cgroups",
    )


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/system.slice/nginx.service", "/system.slice/nginx.service", True),
        ("/system.slice/*", "/system.slice/nginx.service", True),
        ("/system.slice/*", "/system.slice/nginx.service/worker", False),
        ("/system.slice/*", "/system.slice", False),
        ("/system.slice/**", "/system.slice/nginx.service/worker", True),
        ("/system.slice/**", "/system.slice", True),
        ("/**/session-*.scope", "/user.slice/user-1000.slice/session-3.scope", True),
        ("/user.slice/*/session-?.scope", "/user.slice/user-1000.slice/session-3.scope", True),
        ("/user.slice/*/session-?.scope", "/user.slice/user-1000.slice/session-31.scope", False),
        ("/", "/", True),
        ("/*", "/", False),
        ("/**", "/", True),
        ("/a.slice/[ab].service", "/a.slice/b.service", True),
    ],
)
def test_cgroup_globs_stay_within_a_component(pattern: str, path: str, matches: bool) -> None:
    assert cgroup_matches(pattern, path) is matches


def test_an_exe_must_be_listed_and_trustworthy() -> None:
    policy = ProgramPolicy(exes=("/usr/sbin/nginx",))
    assert refusal(policy, _who()) is None
    assert refusal(policy, _who(exe="/usr/bin/python3.11")) == Refusal(
        "exe", "exe /usr/bin/python3.11 is not in allow_exe"
    )
    deleted = _who(
        exe="/usr/sbin/nginx (deleted)",
        exe_problem="not at that path (deleted, replaced or in another mount namespace)",
    )
    assert refusal(policy, deleted) == Refusal(
        "exe",
        'exe "/usr/sbin/nginx (deleted)": not at that path (deleted, replaced or in another '
        "mount namespace)",
    )
    # Listed, but a user could put another file there: refused all the same.
    writable = _who(exe_problem="/usr/sbin is writable by a non-root user")
    assert refusal(policy, writable) == Refusal(
        "exe", "exe /usr/sbin/nginx: /usr/sbin is writable by a non-root user"
    )
    assert refusal(policy, _who(exe=None, exe_problem="unreadable")) == Refusal(
        "exe", "exe ?: unreadable"
    )


def test_every_key_set_must_pass() -> None:
    policy = ProgramPolicy(
        units=("nginx.service",),
        cgroups=("/system.slice/*",),
        exes=("/usr/sbin/nginx",),
    )
    assert refusal(policy, _who()) is None
    assert refusal(policy, _who(exe="/usr/bin/perl")).check == "exe"  # type: ignore[union-attr]
    moved = _who(cgroup="/other.slice/nginx.service", trusted="/other.slice/nginx.service")
    assert refusal(policy, moved).check == "cgroup"  # type: ignore[union-attr]
    assert refusal(policy, _who(unit="php-fpm.service")).check == "unit"  # type: ignore[union-attr]


def test_hostile_names_in_reasons_are_quoted() -> None:
    who = _who(unit='a"b\nc.service')
    found = refusal(ProgramPolicy(units=("nginx.service",)), who)
    assert found is not None and "\n" not in found.reason
    assert found.reason == 'unit "a\\x22b\\x0ac.service" is not in allow_units'
