"""Policy semantics, read from the policy JSON terraform rendered for each variant.

The documents come from one `terraform plan` of a root that calls every module with every
variant of tests/terraform/variants.py (`terraform show -json`: the data sources read while
planning, and the planned resources). These assertions cover what no emulator evaluates:
encryption-context conditions, key policies, trust policies and resource scoping. Inputs the
modules must refuse are planned too, and must fail with the module's own message.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.terraform.conftest import policy_of, resource_of
from tests.terraform.policy import (
    DATA_PLANE,
    DECRYPTING,
    ENCRYPTING,
    allowing,
    covers,
    denied_on,
    denied_on_every_key_but,
    name_patterns,
    principals,
    requires_host_binding,
    requires_name_binding,
    statements,
    unconditionally_denied,
)
from tests.terraform.rendered import Rendered
from tests.terraform.variants import (
    ACCOUNT,
    BUILDER,
    CI_ROLE,
    GOOD,
    HOST_ROLE,
    INVALID,
    KEY_ARN,
    PRECONDITION,
    SEAL_ARN,
)

pytestmark = pytest.mark.terraform

ENCRYPTORS = [label for label, (module, _) in GOOD.items() if module == "encryptor-role"]
HOSTS = [label for label, (module, _) in GOOD.items() if module == "resolver-host"]
KEYS = [label for label, (module, _) in GOOD.items() if module == "kms-key"]


def all_policies(plan: Rendered) -> list[tuple[str, dict[str, Any]]]:
    """Every rendered KMS policy: role policies and key policies (the seal key's too)."""
    found = [(label, policy_of(plan, label, "kms")) for label in ENCRYPTORS + HOSTS]
    found += [(label, policy_of(plan, label, "this")) for label in KEYS]
    found.append(
        ("key_seal seal", plan.policy("module.key_seal.data.aws_iam_policy_document.seal[0]"))
    )
    return found


# --- the CI role -----------------------------------------------------------------------------


@pytest.mark.parametrize("label", ENCRYPTORS)
def test_the_ci_role_can_never_decrypt(good_plan: Rendered, label: str) -> None:
    policy = policy_of(good_plan, label, "kms")
    for action in (*DECRYPTING, "kms:ReEncryptTo", "kms:CreateGrant"):
        assert not allowing(policy, action), action
        assert unconditionally_denied(policy, action), f"{action} is not explicitly denied"


def test_the_ci_role_may_only_encrypt_generate_and_describe(good_plan: Rendered) -> None:
    policy = policy_of(good_plan, "enc_default", "kms")
    allowed = sorted({a for s in statements(policy, "Allow") for a in s["Action"]})
    assert allowed == ["kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey"]
    for statement in statements(policy, "Allow"):
        assert statement["Resource"] == [KEY_ARN], "an allow reaches beyond the one key"


def test_the_ci_role_encrypts_any_name_or_only_its_prefix(good_plan: Rendered) -> None:
    (anything,) = allowing(policy_of(good_plan, "enc_default", "kms"), "kms:Encrypt")
    assert name_patterns(anything) == ["*"]
    (prefixed,) = allowing(policy_of(good_plan, "enc_prefix", "kms"), "kms:Encrypt")
    assert name_patterns(prefixed) == ["web/prod/*"]
    (web,) = allowing(policy_of(good_plan, "enc_prefix_web", "kms"), "kms:Encrypt")
    assert name_patterns(web) == ["web/*"]
    (dots,) = allowing(policy_of(good_plan, "enc_prefix_dots", "kms"), "kms:Encrypt")
    assert name_patterns(dots) == ["a.b/*"]


# --- the host role ---------------------------------------------------------------------------


@pytest.mark.parametrize("label", [h for h in HOSTS if h != "host_seal"])
def test_the_host_role_can_never_encrypt(good_plan: Rendered, label: str) -> None:
    policy = policy_of(good_plan, label, "kms")
    for action in (*ENCRYPTING, "kms:CreateGrant"):
        assert not allowing(policy, action), action
        assert unconditionally_denied(policy, action), f"{action} is not explicitly denied"


def test_the_host_role_may_only_decrypt_the_names_it_is_given(good_plan: Rendered) -> None:
    policy = policy_of(good_plan, "host_names", "kms")
    allowed = sorted({a for s in statements(policy, "Allow") for a in s["Action"]})
    assert allowed == ["kms:Decrypt"]
    (decrypt,) = allowing(policy, "kms:Decrypt")
    assert decrypt["Resource"] == [KEY_ARN]
    assert name_patterns(decrypt) == ["db-password", "web/*"]
    assert not allowing(policy, "kms:ReEncryptFrom")


def test_the_host_role_is_for_ec2_only(good_plan: Rendered) -> None:
    (trust,) = statements(policy_of(good_plan, "host_default", "trust"))
    assert trust["Action"] == ["sts:AssumeRole"]
    assert trust["Principal"] == {"Service": ["ec2.amazonaws.com"]}


def test_the_role_policy_resource_carries_the_rendered_document(good_plan: Rendered) -> None:
    for label in HOSTS + ENCRYPTORS:
        role_policy = resource_of(good_plan, label, "aws_iam_role_policy.kms")
        assert good_plan.policy(f"module.{label}.aws_iam_role_policy.kms") == policy_of(
            good_plan, label, "kms"
        ), label
        assert role_policy["name"] in ("kmskeys-decrypt", "kmskeys-encrypt")


# --- the seal key (stored: keystore, seal = "kms") -------------------------------------------


def test_the_sealing_host_wraps_only_under_the_seal_key_bound_to_itself(
    good_plan: Rendered,
) -> None:
    policy = policy_of(good_plan, "host_seal", "kms")
    (seal,) = [s for s in statements(policy, "Allow") if s["Sid"] == "SealWithHostBinding"]
    assert seal["Action"] == ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]
    assert seal["Resource"] == [SEAL_ARN]
    assert requires_host_binding(seal), seal
    # Only the seal statement encrypts, and only under the seal key.
    for action in ENCRYPTING:
        for statement in allowing(policy, action):
            assert statement is not None and statement["Sid"] == "SealWithHostBinding", action


def test_the_sealing_host_still_never_encrypts_under_any_other_key(good_plan: Rendered) -> None:
    policy = policy_of(good_plan, "host_seal", "kms")
    for action in (*ENCRYPTING, "kms:CreateGrant"):
        assert denied_on_every_key_but(policy, action, SEAL_ARN), action
    # On the seal key itself, nothing but wrap and unwrap.
    for action in (
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
        "kms:CreateGrant",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:GenerateDataKeyPair",
        "kms:GenerateDataKeyPairWithoutPlaintext",
    ):
        assert denied_on(policy, action, SEAL_ARN), action
    for action in ("kms:Encrypt", "kms:GenerateDataKey", "kms:Decrypt"):
        assert not denied_on(policy, action, SEAL_ARN), action
    # Decrypt of secrets is unchanged: the name binding, the secrets key only.
    (decrypt,) = [s for s in statements(policy, "Allow") if s["Sid"] == "DecryptWithNameBinding"]
    assert decrypt["Resource"] == [KEY_ARN] and requires_name_binding(decrypt)


def test_without_the_seal_nothing_of_it_is_rendered(good_plan: Rendered) -> None:
    policy = policy_of(good_plan, "host_default", "kms")
    assert [s["Sid"] for s in statements(policy)] == ["DecryptWithNameBinding", "NeverEncrypt"]
    assert not good_plan.has("module.key_default.aws_kms_key.seal[0]")
    assert not good_plan.has("module.key_default.data.aws_iam_policy_document.seal[0]")


def test_the_seal_key_policy_binds_every_use_to_the_host(good_plan: Rendered) -> None:
    policy = good_plan.policy("module.key_seal.data.aws_iam_policy_document.seal[0]")
    (admin,) = [s for s in statements(policy, "Allow") if s["Sid"] == "AccountAdministration"]
    assert principals(admin) == [f"arn:aws:iam::{ACCOUNT}:root"]
    for action in (*DATA_PLANE, "kms:CreateGrant"):
        assert not covers(admin, action), action
    (seal,) = [s for s in statements(policy, "Allow") if s["Sid"] == "SealWithHostBinding"]
    assert principals(seal) == [HOST_ROLE]
    assert seal["Action"] == ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]
    assert requires_host_binding(seal), seal
    (deny,) = statements(policy, "Deny")
    assert deny["Principal"] == {"AWS": ["*"]}
    assert deny["Condition"] == {"Null": {"kms:EncryptionContext:kmskeys_host": ["true"]}}
    for action in DATA_PLANE:
        assert covers(deny, action), action


def test_the_seal_key_is_its_own_rotating_key_with_its_own_alias(good_plan: Rendered) -> None:
    key = resource_of(good_plan, "key_seal", "aws_kms_key.seal[0]")
    assert key["enable_key_rotation"] is True
    assert key["customer_master_key_spec"] == "SYMMETRIC_DEFAULT"
    assert key["bypass_policy_lockout_safety_check"] is False
    assert good_plan.policy("module.key_seal.aws_kms_key.seal[0]") == good_plan.policy(
        "module.key_seal.data.aws_iam_policy_document.seal[0]"
    )
    alias = resource_of(good_plan, "key_seal", "aws_kms_alias.seal[0]")
    assert alias["name"] == "alias/kmst-seal"
    # The secrets key's policy never mentions the host binding: the two keys stay apart.
    secrets = policy_of(good_plan, "key_seal", "this")
    assert "kmskeys_host" not in str(secrets)


def test_the_policy_variable_reaches_aws_unexpanded(good_plan: Rendered) -> None:
    # Terraform must not interpolate it: AWS substitutes the caller's instance ARN.
    raw = good_plan.values("module.host_seal.data.aws_iam_policy_document.kms")["json"]
    assert '"${ec2:SourceInstanceARN}"' in raw


# --- every policy ----------------------------------------------------------------------------


def test_every_data_plane_allow_carries_the_name_binding(good_plan: Rendered) -> None:
    checked = 0
    for label, policy in all_policies(good_plan):
        for statement in statements(policy, "Allow"):
            if any(covers(statement, a) for a in DATA_PLANE):
                if statement["Sid"] == "SealWithHostBinding":
                    # The seal's name is present too, and the host binding narrows it further.
                    assert requires_host_binding(statement), f"{label}: {statement}"
                    continue
                assert requires_name_binding(statement), f"{label}: {statement}"
                assert name_patterns(statement), f"{label}: no name pattern in {statement}"
                checked += 1
    assert checked >= 15


def test_describe_key_is_the_only_unconditioned_kms_allow(good_plan: Rendered) -> None:
    for label, policy in all_policies(good_plan):
        for statement in statements(policy, "Allow"):
            if "Condition" in statement or label.startswith("key"):
                continue
            assert statement["Action"] == ["kms:DescribeKey"], f"{label}: {statement}"


def test_no_policy_uses_wildcard_kms_actions_in_an_allow(good_plan: Rendered) -> None:
    for label, policy in all_policies(good_plan):
        for statement in statements(policy, "Allow"):
            for action in statement["Action"]:
                assert "*" not in action, f"{label}: {action}"


# --- the key policy --------------------------------------------------------------------------


def test_the_key_policy_keeps_account_administration_without_use(good_plan: Rendered) -> None:
    policy = policy_of(good_plan, "key_default", "this")
    (admin,) = [s for s in statements(policy, "Allow") if s["Sid"] == "AccountAdministration"]
    assert principals(admin) == [f"arn:aws:iam::{ACCOUNT}:root"]
    for action in ("kms:PutKeyPolicy", "kms:ScheduleKeyDeletion", "kms:EnableKeyRotation"):
        assert covers(admin, action), action
    for action in (*DATA_PLANE, "kms:CreateGrant"):
        assert not covers(admin, action), f"the root statement delegates {action} to IAM"


def test_the_key_policy_grants_encrypt_to_encryptors_and_decrypt_to_hosts(
    good_plan: Rendered,
) -> None:
    policy = policy_of(good_plan, "key_default", "this")
    for action in ENCRYPTING:
        for statement in allowing(policy, action):
            assert principals(statement) == [CI_ROLE], action
    for action in DECRYPTING:
        for statement in allowing(policy, action):
            assert principals(statement) == [HOST_ROLE], action
    assert allowing(policy, "kms:Encrypt") and allowing(policy, "kms:Decrypt")
    assert not allowing(policy, "kms:ReEncryptFrom")
    assert not allowing(policy, "kms:CreateGrant")


def test_the_key_policy_without_principals_lets_nobody_use_the_key(good_plan: Rendered) -> None:
    policy = policy_of(good_plan, "key_nobody", "this")
    for action in DATA_PLANE:
        assert not allowing(policy, action), action


def test_the_key_policy_denies_everyone_any_use_without_a_name(good_plan: Rendered) -> None:
    policy = policy_of(good_plan, "key_default", "this")
    (deny,) = statements(policy, "Deny")
    assert deny["Principal"] == {"AWS": ["*"]}
    assert deny["Condition"] == {"Null": {"kms:EncryptionContext:kmskeys_name": ["true"]}}
    for action in DATA_PLANE:
        assert covers(deny, action), action
    assert not covers(deny, "kms:DescribeKey")


def test_the_key_policy_name_patterns_follow_the_inputs(good_plan: Rendered) -> None:
    policy = policy_of(good_plan, "key_patterns", "this")
    (encrypt,) = allowing(policy, "kms:Encrypt")
    (decrypt,) = allowing(policy, "kms:Decrypt")
    assert name_patterns(encrypt) == ["web/*"]
    assert name_patterns(decrypt) == ["web/a", "web/b"]


def test_the_key_resource_carries_the_rendered_key_policy(good_plan: Rendered) -> None:
    for label in KEYS:
        assert good_plan.policy(f"module.{label}.aws_kms_key.this") == policy_of(
            good_plan, label, "this"
        ), label


# --- the key itself --------------------------------------------------------------------------


@pytest.mark.parametrize(("label", "multi_region"), [("key_default", False), ("key_multi", True)])
def test_the_key_is_symmetric_rotating_and_aliased(
    good_plan: Rendered, label: str, multi_region: bool
) -> None:
    key = resource_of(good_plan, label, "aws_kms_key.this")
    assert key["customer_master_key_spec"] == "SYMMETRIC_DEFAULT"
    assert key["key_usage"] == "ENCRYPT_DECRYPT"
    assert key["enable_key_rotation"] is True
    assert key["rotation_period_in_days"] == 365
    assert key["deletion_window_in_days"] == (14 if multi_region else 30)
    assert key["multi_region"] is multi_region
    assert key["bypass_policy_lockout_safety_check"] is False
    alias = resource_of(good_plan, label, "aws_kms_alias.this")
    assert alias["name"] == "alias/kmst"


def test_the_bounds_of_the_key_inputs_are_accepted(good_plan: Rendered) -> None:
    key = resource_of(good_plan, "key_bounds", "aws_kms_key.this")
    assert key["deletion_window_in_days"] == 7
    assert key["rotation_period_in_days"] == 2560
    assert (
        resource_of(good_plan, "key_bounds", "aws_kms_alias.this")["name"] == "alias/kmskeys-prod"
    )


# --- the GitHub trust ------------------------------------------------------------------------


def test_github_trust_is_bound_to_audience_repository_and_refs(good_plan: Rendered) -> None:
    (trust,) = statements(policy_of(good_plan, "enc_refs", "trust"))
    assert trust["Action"] == ["sts:AssumeRoleWithWebIdentity"]
    provider = f"arn:aws:iam::{ACCOUNT}:oidc-provider/token.actions.githubusercontent.com"
    assert trust["Principal"] == {"Federated": [provider]}
    condition = trust["Condition"]
    assert condition["StringEquals"] == {
        "token.actions.githubusercontent.com:aud": ["sts.amazonaws.com"]
    }
    assert condition["StringLike"] == {
        "token.actions.githubusercontent.com:sub": [
            "repo:example-org/app:environment:prod",
            "repo:example-org/app:ref:refs/heads/main",
            "repo:example-org/app:ref:refs/heads/release/*",
        ]
    }


def test_plain_principal_trust_replaces_github(good_plan: Rendered) -> None:
    (trust,) = statements(policy_of(good_plan, "enc_plain", "trust"))
    assert trust["Action"] == ["sts:AssumeRole"]
    assert trust["Principal"] == {"AWS": [BUILDER]}


# --- inputs the modules refuse ---------------------------------------------------------------


def test_every_invalid_input_is_refused_by_its_own_validation(
    invalid_diagnostics: list[Any],
) -> None:
    refused: dict[str, list[tuple[str, str]]] = {}
    for diagnostic in invalid_diagnostics:
        assert diagnostic["severity"] == "error", diagnostic
        assert diagnostic["summary"] == "Invalid value for variable", diagnostic
        snippet = diagnostic["snippet"]
        assert snippet["context"].startswith('module "'), diagnostic
        label = snippet["context"].split('"')[1]
        argument = snippet["code"].split("=")[0].strip()
        refused.setdefault(label, []).append((argument, diagnostic["detail"]))
    assert sorted(refused) == sorted(INVALID)
    for label, (module, inputs) in INVALID.items():
        ((argument, detail),) = refused[label]
        assert [argument] == list(inputs), f"{label}: {argument} was refused"
        assert f"/modules/{module}/variables.tf" in detail, detail


def test_every_precondition_refuses_its_case(precondition_diagnostics: list[Any]) -> None:
    seen = []
    for diagnostic in precondition_diagnostics:
        assert diagnostic["severity"] == "error", diagnostic
        assert diagnostic["summary"] == "Resource precondition failed", diagnostic
        assert diagnostic["detail"], diagnostic
        module = diagnostic["range"]["filename"].split("/modules/")[1].split("/")[0]
        seen.append((module, diagnostic["snippet"]["code"]))
    assert len(seen) == len(PRECONDITION), seen
    for label, (module, _, refers_to) in PRECONDITION.items():
        matching = [code for m, code in seen if m == module and refers_to in code]
        assert len(matching) == 1, f"{label}: {seen}"
