"""The `sm:` and `ssm:` grammar (kmskeys/awsname.py) and how a client reads what it names
(kmskeys/secretref.py): one spelling per request, hostile text refused and never echoed whole."""

from __future__ import annotations

import pytest

from kmskeys import _describe
from kmskeys.awsname import (
    SmQuery,
    SsmQuery,
    parse_sm,
    parse_sm_selector,
    parse_ssm,
    parse_ssm_selector,
    sm_description,
    ssm_description,
)
from kmskeys.errors import InvalidNameError
from kmskeys.exec_plan import Mapping, UsageError
from kmskeys.secretref import described, split_reference
from resolver import spec_sm, spec_ssm

pytestmark = pytest.mark.unit

VERSION_ID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("selector", "query"),
    [
        ("", SmQuery()),
        ("#password", SmQuery(field="password")),
        ("#db.port", SmQuery(field="db.port")),
        ("#stage=AWSPREVIOUS", SmQuery(stage="AWSPREVIOUS")),
        ("#password#stage=blue-2", SmQuery(field="password", stage="blue-2")),
        (f"#version={VERSION_ID}", SmQuery(version_id=VERSION_ID)),
        (f"#api_key#version={VERSION_ID}", SmQuery(field="api_key", version_id=VERSION_ID)),
    ],
)
def test_every_sm_selector_has_one_spelling(selector: str, query: SmQuery) -> None:
    parsed = parse_sm_selector(selector)
    assert parsed == query and parsed.selector() == selector
    assert parse_sm(f"prod/db{selector}") == ("prod/db", query)
    assert sm_description("sm", "prod/db", query) == f"sm:prod/db{selector}"


@pytest.mark.parametrize(
    ("selector", "why"),
    [
        ("#stage=AWSCURRENT", "spelled"),  # the default has no spelling
        ("#stage=AWSPREVIOUS#password", "the field comes first"),
        ("#a#b", "must be"),
        (f"#stage=x#version={VERSION_ID}", "one field and one version at most"),
        ("#", "1 to 128"),
        ("#pass word", "1 to 128"),
        ("#password#", "must be"),
        ("#label=x", "must be"),
        ("#version=short", "32 to 64"),
        ("#stage=" + "x" * 257, "1 to 256"),
        ("#" + "f" * 129, "1 to 128"),
        ("password", "starts with '#'"),
        ("#\nstage=x", "must be"),
    ],
)
def test_other_sm_selectors_are_refused(selector: str, why: str) -> None:
    with pytest.raises(InvalidNameError, match=why):
        parse_sm_selector(selector)


@pytest.mark.parametrize(
    ("selector", "query", "suffix"),
    [
        ("", SsmQuery(), ""),
        ("#3", SsmQuery(version=3), ":3"),
        ("#blue", SsmQuery(label="blue"), ":blue"),
        ("#Release_1.2-b", SsmQuery(label="Release_1.2-b"), ":Release_1.2-b"),
    ],
)
def test_ssm_selectors_carry_aws_own_syntax(selector: str, query: SsmQuery, suffix: str) -> None:
    parsed = parse_ssm_selector(selector)
    assert parsed == query and parsed.selector() == selector and parsed.aws_suffix() == suffix
    assert parse_ssm(f"app/prod/db{selector}") == ("app/prod/db", query)
    assert ssm_description("ssm", "app/prod/db", query) == f"ssm:app/prod/db{selector}"


@pytest.mark.parametrize(
    "selector", ["#0", "#03", "#1a", "#aws", "#SSMx", "#awsome", "#a:b", "#a/b", "#", "3", "#a#b"]
)
def test_other_ssm_selectors_are_refused(selector: str) -> None:
    with pytest.raises(InvalidNameError):
        parse_ssm_selector(selector)


def test_a_client_reads_names_selectors_and_whole_descriptions() -> None:
    assert described("db-password") == "kms:db-password"
    assert described("prod/db#password", "sm") == "sm:prod/db#password"
    assert described("sm:prod/db#password") == "sm:prod/db#password"
    assert described(b"ssm:app/prod/db#3") == "ssm:app/prod/db#3"
    assert split_reference("sm:prod/db#password#stage=AWSPREVIOUS") == (
        "sm",
        "prod/db",
        "#password#stage=AWSPREVIOUS",
    )
    # get_secret's path reads the same way, through the same module.
    assert _describe("sm:prod/db#password", "kms") == b"sm:prod/db#password"
    assert _describe("db", "sm") == b"sm:db"
    assert _describe("email/work#field=login", "pass") == b"pass:email/work#field=login"
    # A prefix the client does not know: a selector some backend's grammar accepts; the
    # resolver, which knows which backend serves the prefix, decides.
    assert described("vault:app/db#field=login") == "vault:app/db#field=login"
    assert described("aws:prod/db#password#stage=AWSPREVIOUS") == (
        "aws:prod/db#password#stage=AWSPREVIOUS"
    )
    assert described("stored:key#machine#v2") == "stored:key#machine#v2"


@pytest.mark.parametrize(
    ("ref", "prefix", "why"),
    [
        ("db#password", "kms", "take no selector"),
        ("sm:prod/db", "ssm", "give one of them"),
        ("SM:prod/db", "kms", "prefix"),
        ("sm:../etc/passwd", "kms", "must start with a letter"),
        ("sm:prod/../etc", "kms", "'..'"),
        ("sm:prod/db#stage=AWSCURRENT", "kms", "spelled"),
        ("ssm:app/db#aws1", "kms", "aws or ssm"),
        ("vault:app/db#a b", "kms", "fits no backend's grammar"),
        ("vault:app/db#", "kms", "#all or #field=KEY"),
        ("pass:email/work#field=a b", "kms", "field key"),
        ("token:key#x", "kms", "take no selector"),
        (b"sm:\xffdb", "kms", "ASCII"),
    ],
)
def test_a_bad_reference_is_an_invalid_name(ref: str | bytes, prefix: str, why: str) -> None:
    with pytest.raises(InvalidNameError, match=why):
        described(ref, prefix)


def test_a_hostile_reference_is_never_echoed_whole() -> None:
    hostile = "sm:prod/db#" + "\x1b[31m" + "x" * 10_000
    with pytest.raises(InvalidNameError) as caught:
        described(hostile)
    assert len(str(caught.value)) < 300 and "\x1b" not in str(caught.value)


def test_exec_maps_whole_descriptions_with_selectors() -> None:
    mapping = Mapping()
    mapping.add_env("DB=sm:prod/db#password", "--env")
    mapping.add_env("PREV=sm:prod/db#password#stage=AWSPREVIOUS", "--env")
    mapping.add_file("api=ssm:app/prod/api#3", "--file")
    assert mapping.names() == [
        "sm:prod/db#password",
        "sm:prod/db#password#stage=AWSPREVIOUS",
        "ssm:app/prod/api#3",
    ]
    with pytest.raises(InvalidNameError, match="take no selector"):
        Mapping().add_env("DB=db#password", "--env")
    assert Mapping("sm").add_env("DB=prod/db#password", "--env") is None
    with pytest.raises(UsageError, match="never their values"):
        Mapping().add_env("DB=sm:prod/db#hunter 2", "env-file:1", quote=False)


def test_the_resolver_splits_with_the_same_grammar() -> None:
    assert spec_sm.split("prod/db#password") == ("prod/db", "#password")
    assert spec_ssm.split("app/prod/db#3") == ("app/prod/db", "#3")
    with pytest.raises(InvalidNameError):
        spec_sm.split("../db#password")
