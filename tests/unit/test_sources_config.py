"""The `sm:` and `ssm:` settings: strict allowlists, path prefixes, what a name maps to, and the
config rules that tie them to the rest (regions, prefixes, policy tables, endpoints)."""

from __future__ import annotations

from typing import Any

import pytest

from kmskeys.awsname import SmQuery, SsmQuery
from resolver.awsclient import endpoint_for
from resolver.config import Config, parse
from resolver.errors import ConfigError, RefusedError
from resolver.install import aws_sources
from resolver.parameterstore import ParameterValue, aws_name
from resolver.policy import check_allowed
from resolver.prefetch import source_names
from resolver.secretsmanager import SecretValue

pytestmark = pytest.mark.unit

ARN = "arn:aws:secretsmanager:eu-central-1:111122223333:secret:shared/api-AbCdEf"
PARAM_ARN = "arn:aws:ssm:eu-central-1:111122223333:parameter/shared/db"


def config(**values: Any) -> Config:
    return parse({"region": "eu-west-1", **values})


def test_names_patterns_and_arns_make_the_allowlist() -> None:
    found = config(sm_secrets=["prod/*", "prod/db", ARN], ssm_parameters=["/app/*", PARAM_ARN])
    assert found.sm_secrets == ("prod/*", "prod/db", ARN)
    # By name: the first region; by ARN: the ARN's own, whatever the request says.
    target = SecretValue("prod/db", SmQuery()).authorize(found)
    assert (target.resource, target.region) == ("prod/db", "eu-west-1")
    target = SecretValue("shared/api", SmQuery()).authorize(found)
    assert (target.resource, target.region) == (ARN, "eu-central-1")
    target = ParameterValue("shared/db", SsmQuery()).authorize(found)
    assert (target.resource, target.region) == (PARAM_ARN, "eu-central-1")
    target = ParameterValue("app/x/y", SsmQuery()).authorize(found)
    assert (target.resource, target.region) == ("/app/x/y", "eu-west-1")
    for op in (SecretValue("dev/db", SmQuery()), ParameterValue("dev/db", SsmQuery())):
        with pytest.raises(RefusedError, match="not allowed"):
            op.authorize(found)


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"sm_secrets": "prod/*"}, "must be a list"),
        ({"sm_secrets": ["prod db"]}, "must be an ARN, or a name or pattern"),
        ({"sm_secrets": ["prod/[ab]"]}, "must be an ARN, or a name or pattern"),
        ({"sm_secrets": ["arn:aws:kms:eu-west-1:111122223333:key/x"]}, "not a full"),
        ({"sm_secrets": ["arn:aws:secretsmanager:eu-west-1:111122223333:secret:db"]}, "-XXXXXX"),
        ({"sm_secrets": ["arn:aws:secretsmanager:eu-west-1:1111:secret:db-AbCdEf"]}, "12-digit"),
        ({"ssm_parameters": ["arn:aws:secretsmanager:x:111122223333:secret:a-AbCdEf"]}, "ssm"),
        ({"ssm_parameters": ["/app/db=1"]}, "must be an ARN"),
        ({"ssm_types": ["SecureString", "Binary"]}, "SecureString, String, StringList"),
        ({"ssm_types": []}, "non-empty"),
        ({"sm_path_prefix": "prod"}, "ending in /"),
        ({"sm_path_prefix": "../"}, "ending in /"),
        ({"ssm_path_prefix": "/app/"}, "ending in /"),
        # An exact name no kmskeys name can ask for: refused at load, not at the first miss.
        ({"sm_secrets": ["prod/db=x"]}, "cannot be asked for"),
        ({"sm_secrets": ["dev/db"], "sm_path_prefix": "prod/"}, "cannot be asked for"),
        ({"ssm_parameters": ["/a//b"]}, "cannot be asked for"),
        ({"sm_prefix": "kms"}, "must differ"),
        ({"ssm_prefix": "sm"}, "must differ"),
        ({"sm_endpoint_url": "ftp://x"}, "http"),
    ],
)
def test_a_bad_setting_is_a_config_error(values: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        config(**values)


def test_names_need_a_region_arns_do_not() -> None:
    with pytest.raises(ConfigError, match="set region"):
        parse({"sm_secrets": ["prod/*"]})
    with pytest.raises(ConfigError, match="set region"):
        parse({"ssm_parameters": ["/app/*"]})
    assert parse({"sm_secrets": [ARN], "ssm_parameters": [PARAM_ARN]}).regions == ()


def test_path_prefixes_map_kmskeys_names() -> None:
    found = config(
        sm_secrets=["prod/*"],
        sm_path_prefix="prod/",
        ssm_parameters=["/app/prod/*"],
        ssm_path_prefix="app/prod/",
    )
    assert SecretValue(found.sm_path_prefix + "db", SmQuery()).authorize(found).resource == (
        "prod/db"
    )
    assert aws_name(found.ssm_path_prefix + "db") == "/app/prod/db"
    # One level: the simple name (AWS takes /db and db for one parameter).
    assert (aws_name("db"), aws_name("a/b")) == ("db", "/a/b")


def test_each_source_has_its_policy_table() -> None:
    found = parse(
        {
            "region": "eu-west-1",
            "sm_secrets": ["*"],
            "sm": {"prod/*": {"allow_users": ["www-data"], "ttl": 60}},
            "ssm": {"app/*": {"allow_users": ["nobody"]}},
        }
    )
    assert found.ttl_for("prod/db", "sm") == 60 and found.ttl_for("prod/db", "ssm") == 300
    with pytest.raises(RefusedError, match=r"policy: sm 'prod/\*'"):
        check_allowed(found, "prod/db", 0, "root", "sm")
    with pytest.raises(RefusedError, match=r"policy: ssm 'app/\*'"):
        check_allowed(found, "app/db", 0, "root", "ssm")
    check_allowed(found, "app/db", 0, "root", "sm")  # another table's rule does not apply
    with pytest.raises(ConfigError, match="unknown key 'scope'"):
        parse({"sm": {"x": {"scope": "machine"}}})


def test_each_service_can_have_its_own_endpoint() -> None:
    found = config(endpoint_url="http://127.0.0.1:1", sm_endpoint_url="http://127.0.0.1:2")
    assert endpoint_for(found, "kms") == "http://127.0.0.1:1"
    assert endpoint_for(found, "secretsmanager") == "http://127.0.0.1:2"
    assert endpoint_for(found, "ssm") == "http://127.0.0.1:1"
    assert endpoint_for(config(), "ssm") is None


def test_install_routes_the_sources_a_config_reads_and_prefetch_knows_their_names() -> None:
    assert aws_sources(config()) == []
    found = config(
        sm_secrets=["prod/db", "prod/*", ARN.replace("shared/", "prod/")],
        sm_path_prefix="prod/",
        ssm_parameters=["/app/*", "/app/db", PARAM_ARN, "simple"],
        sm_prefix="aws",
    )
    assert aws_sources(found) == ["aws", "ssm"]
    # Exact names and ARNs only: a pattern names nothing to prefetch.
    assert source_names(found) == [
        "aws:api",
        "aws:db",
        "ssm:app/db",
        "ssm:shared/db",
        "ssm:simple",
    ]
