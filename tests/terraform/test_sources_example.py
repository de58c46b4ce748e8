"""examples/aws-sources applied to moto: a secret and a parameter, hosts that read exactly those.

The tier applies the example once (tests/terraform/conftest.py, job "sources") with the real
terraform and AWS provider; these tests read the result back through boto3 from the same moto
server, and the last fixture teardown destroys it and checks that nothing is left.

moto stores the secret and the parameter but neither calls KMS with their encryption context
nor evaluates IAM conditions: that the host role decrypts only through Secrets Manager and
Parameter Store, for these ARNs, is asserted on the policies as applied, and their ARN
patterns are matched against the ARNs moto handed out.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from resolver.backend import Context, Request
from resolver.errors import RefusedError
from resolver.gateway import UNMETERED
from tests.terraform import events
from tests.terraform.applied import REGION, Applied
from tests.terraform.conftest import SOURCES_INPUTS
from tests.terraform.events import Probe
from tests.terraform.policy import statements

pytestmark = pytest.mark.terraform

NAME = SOURCES_INPUTS["name"]
RULES = ["kmskeys", "sm-api", "sm-rotation", "ssm"]
EXPECTED = {
    "aws_kms_alias.secrets",
    "aws_kms_key.secrets",
    "aws_secretsmanager_secret.db",
    "aws_secretsmanager_secret_version.db",
    "aws_ssm_parameter.db_password",
    "module.kms_key.aws_kms_alias.this",
    "module.kms_key.aws_kms_key.this",
    "module.hosts.aws_iam_instance_profile.this",
    "module.hosts.aws_iam_role.this",
    "module.hosts.aws_iam_role_policy.kms",
    "module.hosts.aws_iam_role_policy.sources[0]",
    "module.hosts.aws_iam_role_policy.ssm_agent[0]",
    "module.rotation.aws_iam_role.automation[0]",
    "module.rotation.aws_iam_role.events",
    "module.rotation.aws_iam_role_policy.automation[0]",
    "module.rotation.aws_iam_role_policy.events",
    "module.rotation.aws_ssm_document.flush",
    "module.rotation.aws_ssm_document.rollout[0]",
    *(f'module.rotation.aws_cloudwatch_event_rule.this["{k}"]' for k in RULES),
    *(f'module.rotation.aws_cloudwatch_event_target.this["{k}"]' for k in RULES),
}


def gone(call: Any, *codes: str) -> bool:
    """Whether the call fails with one of the not-found codes."""
    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"] in codes
    return False


@pytest.fixture(scope="module")
def sources(sources_run: Applied) -> Iterator[Applied]:
    """The applied example; destroyed after this module, and nothing of it may be left."""
    yield sources_run
    out = sources_run.outputs
    sources_run.destroy()
    moto = sources_run.moto
    sm, ssm, iam = moto.client("secretsmanager"), moto.client("ssm"), moto.client("iam")
    assert gone(lambda: sm.describe_secret(SecretId=out["secret_arn"]), "ResourceNotFoundException")
    assert gone(lambda: ssm.get_parameter(Name=out["parameter_name"]), "ParameterNotFound")
    assert gone(lambda: ssm.describe_document(Name=out["command_document_name"]), "InvalidDocument")
    assert gone(lambda: iam.get_role(RoleName=f"{NAME}-hosts"), "NoSuchEntity")
    assert gone(lambda: iam.get_role(RoleName=f"{NAME}-events"), "NoSuchEntity")
    assert moto.client("events").list_rules(NamePrefix=NAME)["Rules"] == []
    kms = moto.client("kms")
    for key in (out["secrets_key_arn"], out["kmskeys_key_arn"]):
        assert kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "PendingDeletion"


def matches_arn(pattern: str, arn: str) -> bool:
    """IAM's ARN matching: * any run of characters, ? exactly one (ARNs hold no [ or ])."""
    return fnmatch.fnmatchcase(arn, pattern)


def test_apply_created_the_secret_the_parameter_the_hosts_and_the_rotation(
    sources: Applied,
) -> None:
    assert sources.state.addresses("managed") == EXPECTED


def test_the_secret_and_the_parameter_hold_the_value_under_the_example_key(
    sources: Applied,
) -> None:
    out = sources.outputs
    sm, ssm = sources.moto.client("secretsmanager"), sources.moto.client("ssm")
    described = sm.describe_secret(SecretId=out["secret_name"])
    assert described["ARN"] == out["secret_arn"]
    assert described["KmsKeyId"] == out["secrets_key_arn"]
    value = json.loads(sm.get_secret_value(SecretId=out["secret_arn"])["SecretString"])
    assert value == {"username": "app", "password": SOURCES_INPUTS["db_password"]}
    parameter = ssm.get_parameter(Name=out["parameter_name"], WithDecryption=True)["Parameter"]
    assert parameter["Type"] == "SecureString"
    assert parameter["Value"] == SOURCES_INPUTS["db_password"]
    assert out["parameter_name"] == f"/{NAME}/db/password"


def test_the_host_role_reads_exactly_the_created_secret_and_parameter(sources: Applied) -> None:
    out = sources.outputs
    policy = sources.state.policy("module.hosts.aws_iam_role_policy.sources[0]")
    by_sid = {s["Sid"]: s for s in statements(policy)}
    (secret_pattern,) = by_sid["ReadTheGivenSecrets"]["Resource"]
    assert matches_arn(secret_pattern, out["secret_arn"])
    # The pattern is that secret's: not a sibling whose name merely starts the same.
    for other in (f"{NAME}/db2", f"{NAME}/db/x", f"{NAME}/d"):
        assert not matches_arn(secret_pattern, events.secret_arn(REGION, other)), other
    ssm = sources.moto.client("ssm")
    parameter_arn = ssm.get_parameter(Name=out["parameter_name"])["Parameter"]["ARN"]
    assert by_sid["ReadTheGivenParameters"]["Resource"] == [parameter_arn]
    for sid, service, key, arn in (
        (
            "DecryptTheGivenSecretsThroughSecretsManager",
            "secretsmanager",
            "SecretARN",
            secret_pattern,
        ),
        ("DecryptTheGivenParametersThroughParameterStore", "ssm", "PARAMETER_ARN", parameter_arn),
    ):
        statement = by_sid[sid]
        assert statement["Resource"] == [out["secrets_key_arn"]]
        assert statement["Condition"]["StringEquals"] == {
            "kms:ViaService": [f"{service}.{REGION}.amazonaws.com"]
        }
        assert statement["Condition"]["StringLike"] == {f"kms:EncryptionContext:{key}": [arn]}
    assert by_sid["NeverOtherSecrets"]["NotResource"] == [secret_pattern]
    assert by_sid["NeverOtherParameters"]["NotResource"] == [parameter_arn]
    # IAM holds what terraform rendered.
    stored = sources.moto.client("iam").get_role_policy(
        RoleName=f"{NAME}-hosts", PolicyName="kmskeys-aws-sources"
    )["PolicyDocument"]
    assert (json.loads(stored) if isinstance(stored, str) else stored) == policy


def test_the_hosts_carry_the_tag_the_rotation_targets(sources: Applied) -> None:
    iam, ssm = sources.moto.client("iam"), sources.moto.client("ssm")
    tags = {t["Key"]: t["Value"] for t in iam.list_role_tags(RoleName=f"{NAME}-hosts")["Tags"]}
    assert tags["kmskeys-fleet"] == SOURCES_INPUTS["fleet_tag_value"]
    runbook = json.loads(ssm.get_document(Name=sources.outputs["runbook_name"])["Content"])
    (step,) = runbook["mainSteps"]
    assert step["inputs"]["Targets"] == [
        {"Key": "tag:kmskeys-fleet", "Values": [SOURCES_INPUTS["fleet_tag_value"]]}
    ]
    assert step["inputs"]["DocumentName"] == sources.outputs["command_document_name"]
    assert step["inputs"]["MaxConcurrency"] == "10%"


def test_a_rotation_of_the_created_secret_reaches_the_runbook_with_its_arn(
    sources: Applied, probe: Probe
) -> None:
    out = sources.outputs
    client = sources.moto.client("events")
    rules = {r["Name"]: r for r in client.list_rules(NamePrefix=NAME)["Rules"]}
    assert sorted(rules) == sorted(out["rule_names"].values())
    rule = rules[out["rule_names"]["sm-rotation"]]
    (target,) = client.list_targets_by_rule(Rule=rule["Name"])["Targets"]
    account = out["secret_arn"].split(":")[4]
    runbook = f"automation-definition/{out['runbook_name']}:$DEFAULT"
    assert target["Arn"] == f"arn:aws:ssm:{REGION}:{account}:{runbook}"
    rotated = events.rotation_succeeded(REGION, out["secret_arn"])
    assert probe.deliver(rule["EventPattern"], rotated, target) == [
        {
            "Source": ["secretsmanager"],
            "Id": [out["secret_arn"]],
            "Prefix": ["sm"],
            "PathPrefix": [""],
        }
    ]
    # Another secret of the account is none of this fleet's business.
    elsewhere = events.rotation_succeeded(REGION, events.secret_arn(REGION, "other/db"))
    assert probe.deliver(rule["EventPattern"], elsewhere, target) == []
    rule = rules[out["rule_names"]["ssm"]]
    (target,) = client.list_targets_by_rule(Rule=rule["Name"])["Targets"]
    changed = events.parameter_change(REGION, out["parameter_name"])
    assert probe.deliver(rule["EventPattern"], changed, target) == [
        {
            "Source": ["parameterstore"],
            "Id": [out["parameter_name"]],
            "Prefix": ["ssm"],
            "PathPrefix": [""],
        }
    ]


def test_the_resolver_config_it_outputs_serves_the_secret_and_the_parameter(
    sources: Applied, tmp_path: Path
) -> None:
    """The `resolver_config` output, as the hosts' config, through the sm: and ssm: backends
    against the same moto over HTTP: the secret's field and the parameter, by ARN."""
    from resolver.config import parse_text
    from resolver.parameterstore import ParameterStoreBackend
    from resolver.secretsmanager import SecretsManagerBackend

    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    credentials.chmod(0o600)
    extra = (
        f'endpoint_url = "{sources.moto.url}"\nshared_credentials_file = "{credentials}"\n'
        "host_cache = false\n"
    )
    config = parse_text((sources.outputs["resolver_config"] + extra).encode())
    sm = SecretsManagerBackend(config).resolve(
        Request("sm", f"{NAME}/db", 0, 0, "root", b"", "#password"), context()
    )
    assert sm.payload == SOURCES_INPUTS["db_password"].encode()
    assert sm.details["source"] == "secretsmanager"
    ssm = ParameterStoreBackend(config).resolve(
        Request("ssm", f"{NAME}/db/password", 0, 0, "root", b"", ""), context()
    )
    assert ssm.payload == SOURCES_INPUTS["db_password"].encode()
    # Nothing else of the account: another secret's name is refused before any call.
    with pytest.raises(RefusedError, match="not in sm_secrets"):
        SecretsManagerBackend(config).resolve(
            Request("sm", f"{NAME}/other", 0, 0, "root", b"", ""), context()
        )


def context() -> Context:
    return Context(time.monotonic() + 10.0, UNMETERED)
