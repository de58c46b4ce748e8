"""The hosts' Secrets Manager and Parameter Store policy, and fleet-rotation as planned.

From the tier's one plan of every variant (tests/terraform/variants.py): the host role reads
the secrets and parameters it is given and nothing else, its KMS decrypt goes only through
those services for those names; the fleet's rules match the events they should (EventBridge's
pattern engine, moto's here) and no others; the roles may send the flush document to the
tagged hosts and do nothing else. What the plan cannot know (role ARNs, the runbook that
names one) is read back from the applied root (test_rotation_document.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.terraform import events
from tests.terraform.conftest import policy_of, resource_of
from tests.terraform.events import Probe
from tests.terraform.policy import allowing, covers, statements
from tests.terraform.rendered import Rendered
from tests.terraform.variants import ACCOUNT, KEY_ARN, REGION, SECRETS_KEY_ARN

pytestmark = pytest.mark.terraform

SECRET_HEAD = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:"
PARAMETER_HEAD = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/"
SECRETS = sorted([f"{SECRET_HEAD}prod/db-??????", f"{SECRET_HEAD}prod/api/*"])
PARAMETERS = sorted(
    [f"{PARAMETER_HEAD}prod/db/password", f"{PARAMETER_HEAD}prod/api/*", f"{PARAMETER_HEAD}plain"]
)


def sources(plan: Rendered, label: str) -> dict[str, Any]:
    return policy_of(plan, label, "sources[0]")


def by_sid(policy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["Sid"]: s for s in statements(policy)}


# --- the host: the secrets and parameters it is given, nothing else --------------------------


def test_the_host_reads_exactly_the_given_secrets_and_parameters(good_plan: Rendered) -> None:
    policy = by_sid(sources(good_plan, "host_sources"))
    secrets, parameters = policy["ReadTheGivenSecrets"], policy["ReadTheGivenParameters"]
    assert secrets["Action"] == ["secretsmanager:GetSecretValue"]
    # A name gets the six-character suffix of a secret ARN (exactly that secret); a pattern
    # ending in * already covers it.
    assert secrets["Resource"] == SECRETS
    assert parameters["Action"] == ["ssm:GetParameter", "ssm:GetParameters"]
    assert parameters["Resource"] == PARAMETERS
    for statement in (secrets, parameters):
        assert statement["Effect"] == "Allow" and "Condition" not in statement
    # Never a subtree listing nor a parameter's past values.
    allowed = sources(good_plan, "host_sources")
    for action in ("ssm:GetParametersByPath", "ssm:GetParameterHistory", "ssm:PutParameter"):
        assert not allowing(allowed, action), action


@pytest.mark.parametrize(
    ("sid", "service", "context_key", "arns"),
    [
        (
            "DecryptTheGivenSecretsThroughSecretsManager",
            "secretsmanager",
            "SecretARN",
            SECRETS,
        ),
        (
            "DecryptTheGivenParametersThroughParameterStore",
            "ssm",
            "PARAMETER_ARN",
            PARAMETERS,
        ),
    ],
)
def test_kms_decrypt_only_through_the_service_and_for_the_given_names(
    good_plan: Rendered, sid: str, service: str, context_key: str, arns: list[str]
) -> None:
    statement = by_sid(sources(good_plan, "host_sources"))[sid]
    assert statement["Effect"] == "Allow"
    assert statement["Action"] == ["kms:Decrypt"]
    assert statement["Resource"] == [SECRETS_KEY_ARN]
    assert statement["Condition"] == {
        "StringEquals": {"kms:ViaService": [f"{service}.{REGION}.amazonaws.com"]},
        "StringLike": {f"kms:EncryptionContext:{context_key}": arns},
    }


def test_every_kms_allow_of_the_sources_policy_goes_through_a_service(
    good_plan: Rendered,
) -> None:
    policy = sources(good_plan, "host_sources")
    decrypts = allowing(policy, "kms:Decrypt")
    assert len(decrypts) == 2
    for statement in decrypts:
        assert "kms:ViaService" in statement["Condition"]["StringEquals"]
    for action in ("kms:Encrypt", "kms:GenerateDataKey", "kms:ReEncryptFrom", "kms:CreateGrant"):
        assert not allowing(policy, action), action


def test_unlisted_secrets_and_parameters_are_denied_outright(good_plan: Rendered) -> None:
    policy = by_sid(sources(good_plan, "host_sources"))
    secrets, parameters = policy["NeverOtherSecrets"], policy["NeverOtherParameters"]
    assert secrets["Effect"] == parameters["Effect"] == "Deny"
    assert secrets["NotResource"] == SECRETS and "Resource" not in secrets
    assert parameters["NotResource"] == PARAMETERS and "Resource" not in parameters
    for action in ("ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"):
        assert covers(parameters, action), action
    assert "Condition" not in secrets and "Condition" not in parameters


def test_by_default_the_host_reads_no_secret_and_no_parameter(good_plan: Rendered) -> None:
    policy = sources(good_plan, "host_default")
    assert not statements(policy, "Allow")
    for statement in statements(policy, "Deny"):
        assert statement["Resource"] == ["*"], statement
    assert {s["Sid"] for s in statements(policy)} == {"NeverOtherSecrets", "NeverOtherParameters"}
    role_policy = resource_of(good_plan, "host_default", "aws_iam_role_policy.sources[0]")
    assert role_policy["name"] == "kmskeys-aws-sources"
    assert good_plan.policy("module.host_default.aws_iam_role_policy.sources[0]") == policy


def test_aws_managed_keys_need_no_kms_statement(good_plan: Rendered) -> None:
    policy = by_sid(sources(good_plan, "host_sources_aws_keys"))
    assert sorted(policy) == ["NeverOtherParameters", "NeverOtherSecrets", "ReadTheGivenSecrets"]
    assert policy["ReadTheGivenSecrets"]["Resource"] == [f"{SECRET_HEAD}prod/db-??????"]


def test_without_the_denies_and_names_there_is_no_sources_policy(good_plan: Rendered) -> None:
    assert not good_plan.has("module.host_sources_open.aws_iam_role_policy.sources[0]")
    assert not good_plan.has("module.host_sources_open.data.aws_iam_policy_document.sources[0]")


def test_the_ssm_agent_gets_run_command_without_reading_parameters(good_plan: Rendered) -> None:
    (agent,) = statements(policy_of(good_plan, "host_sources", "ssm_agent[0]"))
    assert agent["Effect"] == "Allow"
    for action in ("ssm:UpdateInstanceInformation", "ec2messages:GetMessages"):
        assert covers(agent, action), action
    # AmazonSSMManagedInstanceCore's reads are not here.
    for action in ("ssm:GetParameter", "ssm:GetParameters", "ssm:GetDocument", "kms:Decrypt"):
        assert not covers(agent, action), action
    assert not any("*" in action for action in agent["Action"])
    assert not good_plan.has("module.host_default.aws_iam_role_policy.ssm_agent[0]")


# --- fleet-rotation: the command document ----------------------------------------------------


def command_document(plan: Rendered, label: str) -> dict[str, Any]:
    content = resource_of(plan, label, "aws_ssm_document.flush")["content"]
    parsed = json.loads(content)
    assert isinstance(parsed, dict)
    return parsed


def test_the_command_document_runs_a_shell_script_as_root_with_env_parameters(
    good_plan: Rendered,
) -> None:
    document = command_document(good_plan, "fleet_default")
    assert document["schemaVersion"] == "2.2"
    (step,) = document["mainSteps"]
    assert step["action"] == "aws:runShellScript"
    assert step["precondition"] == {"StringEquals": ["platformType", "Linux"]}
    commands = step["inputs"]["runCommand"]
    # Nothing of an event is ever spliced into the script: every parameter is an environment
    # variable, and each one is constrained.
    assert not any("{{" in line for line in commands), commands
    assert sorted(document["parameters"]) == [
        "Id",
        "JitterSeconds",
        "PathPrefix",
        "Prefix",
        "Source",
    ]
    for name, parameter in document["parameters"].items():
        assert parameter["interpolationType"] == "ENV_VAR", name
        assert "allowedPattern" in parameter or "allowedValues" in parameter, name
    assert "KMSKEYS='/usr/local/bin/kmskeys'" in commands
    assert document["parameters"]["JitterSeconds"]["default"] == "0"
    jittered = command_document(good_plan, "fleet_filtered")["parameters"]["JitterSeconds"]
    assert jittered["default"] == "30"


# --- fleet-rotation: the rules and what they match -------------------------------------------


def rule(plan: Rendered, label: str, kind: str) -> str:
    pattern = resource_of(plan, label, f'aws_cloudwatch_event_rule.this["{kind}"]')
    return str(pattern["event_pattern"])


def matched(probe: Probe, pattern: str, event: dict[str, Any]) -> bool:
    return probe.matches(pattern, event)


def test_secrets_manager_calls_that_change_what_hosts_serve_match(
    good_plan: Rendered, probe: Probe
) -> None:
    pattern = rule(good_plan, "fleet_default", "sm-api")
    call = events.secrets_manager_call
    for event in (
        call(REGION, "PutSecretValue", "prod/db"),
        call(REGION, "PutSecretValue", "prod/db", stages=["AWSCURRENT"]),
        call(REGION, "UpdateSecretVersionStage", events.secret_arn(REGION, "prod/db")),
        call(REGION, "UpdateSecret", "prod/db"),
        call(REGION, "DeleteSecret", "prod/db"),
    ):
        assert matched(probe, pattern, event), event["detail"]
    for event in (
        # A rotation function staging AWSPENDING changes nothing a host serves.
        call(REGION, "PutSecretValue", "prod/db", stages=["AWSPENDING"]),
        # A refused call changed nothing.
        call(REGION, "PutSecretValue", "prod/db", error="AccessDenied"),
        call(REGION, "GetSecretValue", "prod/db"),
        call(REGION, "CancelRotateSecret", "prod/db"),
    ):
        assert not matched(probe, pattern, event), event["detail"]


def test_the_name_filters_hold_for_names_and_arns(good_plan: Rendered, probe: Probe) -> None:
    api = rule(good_plan, "fleet_filtered", "sm-api")
    rotation = rule(good_plan, "fleet_filtered", "sm-rotation")
    parameters = rule(good_plan, "fleet_filtered", "ssm")
    call = events.secrets_manager_call
    assert matched(probe, api, call(REGION, "UpdateSecret", "prod/db"))
    assert matched(probe, api, call(REGION, "UpdateSecret", events.secret_arn(REGION, "prod/db")))
    assert not matched(probe, api, call(REGION, "UpdateSecret", "dev/db"))
    assert not matched(
        probe, api, call(REGION, "UpdateSecret", events.secret_arn(REGION, "dev/db"))
    )
    assert matched(
        probe, rotation, events.rotation_succeeded(REGION, events.secret_arn(REGION, "prod/db"))
    )
    assert not matched(
        probe, rotation, events.rotation_succeeded(REGION, events.secret_arn(REGION, "dev/db"))
    )
    assert matched(probe, parameters, events.parameter_change(REGION, "/prod/db/password"))
    assert not matched(probe, parameters, events.parameter_change(REGION, "/dev/db/password"))
    unfiltered = rule(good_plan, "fleet_default", "ssm")
    for operation in ("Create", "Update", "Delete", "LabelParameterVersion"):
        assert matched(probe, unfiltered, events.parameter_change(REGION, "/x", operation))


def test_kms_rotation_and_flush_requests_match_only_what_they_name(
    good_plan: Rendered, probe: Probe
) -> None:
    kms = rule(good_plan, "fleet_filtered", "kms")
    other_key = KEY_ARN.rsplit("/", 1)[0] + "/00000000-0000-0000-0000-000000000000"
    assert matched(probe, kms, events.key_rotation(REGION, KEY_ARN))
    assert not matched(probe, kms, events.key_rotation(REGION, other_key))
    custom = rule(good_plan, "fleet_filtered", "kmskeys")
    assert matched(probe, custom, events.flush_request(REGION, "web/db", "kms"))
    assert not matched(probe, custom, events.flush_request(REGION, "web/db", "stored"))
    no_name = events.flush_request(REGION, "web/db", "kms")
    del no_name["detail"]["name"]
    assert not matched(probe, custom, no_name)


def test_a_quiet_fleet_has_no_rule_and_no_target(good_plan: Rendered) -> None:
    quiet = [a for a in good_plan.addresses() if a.startswith("module.fleet_quiet.aws_cloudwatch")]
    assert quiet == []
    assert good_plan.has("module.fleet_quiet.aws_ssm_document.flush")


# --- fleet-rotation: targets and roles -------------------------------------------------------


def target(plan: Rendered, label: str, kind: str) -> dict[str, Any]:
    return resource_of(plan, label, f'aws_cloudwatch_event_target.this["{kind}"]')


def test_the_automation_target_starts_the_runbook_with_the_event_s_name(
    good_plan: Rendered,
) -> None:
    runbook = f"arn:aws:ssm:{REGION}:{ACCOUNT}:automation-definition/kmst-fleet-rollout:$DEFAULT"
    api = target(good_plan, "fleet_default", "sm-api")
    assert api["arn"] == runbook
    assert api["run_command_targets"] == []
    (transformer,) = api["input_transformer"]
    assert transformer["input_paths"] == {"id": "$.detail.requestParameters.secretId"}
    assert json.loads(transformer["input_template"].replace("<id>", "prod/db")) == {
        "Source": ["secretsmanager"],
        "Id": ["prod/db"],
        "Prefix": ["sm"],
        "PathPrefix": [""],
    }
    (rotated,) = target(good_plan, "fleet_default", "sm-rotation")["input_transformer"]
    assert rotated["input_paths"] == {"id": "$.detail.additionalEventData.SecretId"}
    kms = target(good_plan, "fleet_filtered", "kms")
    assert kms["input_transformer"] == []
    assert json.loads(kms["input"]) == {
        "Source": ["name"],
        "Id": ["web/a web/b"],
        "Prefix": ["kms"],
    }
    (parameters,) = target(good_plan, "fleet_filtered", "ssm")["input_transformer"]
    template = json.loads(parameters["input_template"].replace("<id>", "/prod/x"))
    assert template["Prefix"] == ["ssm"] and template["PathPrefix"] == ["prod/"]


def test_the_run_command_target_sends_the_document_to_the_tag(good_plan: Rendered) -> None:
    api = target(good_plan, "fleet_run_command", "sm-api")
    assert api["arn"] == f"arn:aws:ssm:{REGION}:{ACCOUNT}:document/kmst-fleet-flush"
    assert api["run_command_targets"] == [{"key": "tag:kmskeys-fleet", "values": ["web"]}]


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("fleet_default", {"max_concurrency": "10%", "max_errors": "10%", "applied_by": "runbook"}),
        ("fleet_filtered", {"max_concurrency": "5", "max_errors": "0", "applied_by": "runbook"}),
        (
            "fleet_run_command",
            {"max_concurrency": "50", "max_errors": "0", "applied_by": "SendCommand defaults"},
        ),
    ],
)
def test_the_rate_controls_say_what_ssm_applies(
    good_plan: Rendered, label: str, expected: dict[str, str]
) -> None:
    change = good_plan.shown["output_changes"][label]
    assert change["after"]["rate_controls"] == expected


def send_statements(policy: dict[str, Any], tag_key: str) -> None:
    """The SendCommand statements: the flush document, and instances carrying the tag."""
    document, hosts = sorted(allowing(policy, "ssm:SendCommand"), key=lambda s: s["Sid"])
    assert document["Resource"] == [f"arn:aws:ssm:{REGION}:{ACCOUNT}:document/kmst-fleet-flush"]
    assert "Condition" not in document
    assert hosts["Resource"] == [
        f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/*",
        f"arn:aws:ssm:{REGION}:{ACCOUNT}:managed-instance/*",
    ]
    assert hosts["Condition"] == {"StringEquals": {f"ssm:resourceTag/{tag_key}": ["web"]}}


def test_eventbridge_may_only_send_the_flush_to_the_tagged_hosts(good_plan: Rendered) -> None:
    policy = policy_of(good_plan, "fleet_run_command", "events")
    send_statements(policy, "kmskeys-fleet")
    assert {a for s in statements(policy) for a in s["Action"]} == {"ssm:SendCommand"}
    assert not statements(policy, "Deny")


def test_the_runbook_role_sends_the_flush_and_follows_it_only(good_plan: Rendered) -> None:
    policy = policy_of(good_plan, "fleet_filtered", "automation")
    send_statements(policy, "team")
    actions = {a for s in statements(policy) for a in s["Action"]}
    assert actions == {
        "ssm:SendCommand",
        "ssm:DescribeInstanceInformation",
        "ssm:ListCommandInvocations",
        "ssm:ListCommands",
    }
