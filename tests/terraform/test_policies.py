"""Policy semantics, read from the modules' own policy documents.

The documents come from evaluating the real .tf files (tests/terraform/hcl_eval.py). These
assertions cover what no emulator evaluates: encryption-context conditions, key policies,
trust policies and resource scoping.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.terraform.conftest import CI_ROLE, HOST_ROLE, KEY_ARN, ModuleFactory
from tests.terraform.policy import (
    DATA_PLANE,
    DECRYPTING,
    ENCRYPTING,
    allowing,
    covers,
    name_patterns,
    principals,
    requires_name_binding,
    statements,
    unconditionally_denied,
)

pytestmark = pytest.mark.terraform

ENCRYPTOR_VARIANTS = [
    {},
    {"secret_name_prefix": "web"},
    {"github_repository": "", "trusted_principal_arns": ["arn:aws:iam::123456789012:role/b"]},
]
HOST_VARIANTS = [{}, {"allowed_secret_names": ["web/*", "db-password"]}]
KEY_VARIANTS = [
    {},
    {"encryptor_principal_arns": [], "decryptor_principal_arns": []},
    {"encrypt_name_patterns": ["web/*"], "decrypt_name_patterns": ["web/a", "web/b"]},
]


def all_policies(module: ModuleFactory) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for variant in ENCRYPTOR_VARIANTS:
        found.append((f"encryptor {variant}", module("encryptor-role", **variant).policy("kms")))
    for variant in HOST_VARIANTS:
        found.append((f"host {variant}", module("resolver-host", **variant).policy("kms")))
    for variant in KEY_VARIANTS:
        found.append((f"key {variant}", module("kms-key", **variant).policy("this")))
    return found


# --- the CI role -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ENCRYPTOR_VARIANTS, ids=str)
def test_the_ci_role_can_never_decrypt(module: ModuleFactory, variant: dict[str, Any]) -> None:
    policy = module("encryptor-role", **variant).policy("kms")
    for action in (*DECRYPTING, "kms:ReEncryptTo", "kms:CreateGrant"):
        assert not allowing(policy, action), action
        assert unconditionally_denied(policy, action), f"{action} is not explicitly denied"


def test_the_ci_role_may_only_encrypt_generate_and_describe(module: ModuleFactory) -> None:
    policy = module("encryptor-role").policy("kms")
    allowed = sorted({a for s in statements(policy, "Allow") for a in s["Action"]})
    assert allowed == ["kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey"]
    for statement in statements(policy, "Allow"):
        assert statement["Resource"] == [KEY_ARN], "an allow reaches beyond the one key"


def test_the_ci_role_encrypts_any_name_or_only_its_prefix(module: ModuleFactory) -> None:
    (anything,) = allowing(module("encryptor-role").policy("kms"), "kms:Encrypt")
    assert name_patterns(anything) == ["*"]
    (prefixed,) = allowing(
        module("encryptor-role", secret_name_prefix="web/prod").policy("kms"), "kms:Encrypt"
    )
    assert name_patterns(prefixed) == ["web/prod/*"]


def test_the_prefix_cannot_be_a_wildcard(module: ModuleFactory) -> None:
    for bad, good in (("*", "web"), ("web/", "web/prod"), ("../x", "a.b")):
        name = "secret_name_prefix"
        assert not validation_passes(module("encryptor-role", secret_name_prefix=bad), name)
        assert validation_passes(module("encryptor-role", secret_name_prefix=good), name)


def validation_passes(mod: Any, name: str) -> bool:
    """Whether var.NAME's validation accepts the value the module was given."""
    (validation,) = mod.variables()[name].children("validation")
    return bool(mod.eval(validation.attributes["condition"]))


# --- the host role ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", HOST_VARIANTS, ids=str)
def test_the_host_role_can_never_encrypt(module: ModuleFactory, variant: dict[str, Any]) -> None:
    policy = module("resolver-host", **variant).policy("kms")
    for action in (*ENCRYPTING, "kms:CreateGrant"):
        assert not allowing(policy, action), action
        assert unconditionally_denied(policy, action), f"{action} is not explicitly denied"


def test_the_host_role_may_only_decrypt_the_names_it_is_given(module: ModuleFactory) -> None:
    policy = module("resolver-host", allowed_secret_names=["web/*", "db-password"]).policy("kms")
    allowed = sorted({a for s in statements(policy, "Allow") for a in s["Action"]})
    assert allowed == ["kms:Decrypt"]
    (decrypt,) = allowing(policy, "kms:Decrypt")
    assert decrypt["Resource"] == [KEY_ARN]
    assert name_patterns(decrypt) == ["web/*", "db-password"]
    assert not allowing(policy, "kms:ReEncryptFrom")


def test_the_host_role_is_for_ec2_only(module: ModuleFactory) -> None:
    (trust,) = statements(module("resolver-host").policy("trust"))
    assert trust["Action"] == ["sts:AssumeRole"]
    assert trust["Principal"] == {"Service": ["ec2.amazonaws.com"]}


# --- every policy ----------------------------------------------------------------------------


def test_every_data_plane_allow_carries_the_name_binding(module: ModuleFactory) -> None:
    checked = 0
    for label, policy in all_policies(module):
        for statement in statements(policy, "Allow"):
            if any(covers(statement, a) for a in DATA_PLANE):
                assert requires_name_binding(statement), f"{label}: {statement}"
                assert name_patterns(statement), f"{label}: no name pattern in {statement}"
                checked += 1
            else:
                assert not any(covers(statement, a) for a in DATA_PLANE)
    assert checked >= 9


def test_describe_key_is_the_only_unconditioned_kms_allow(module: ModuleFactory) -> None:
    for label, policy in all_policies(module):
        for statement in statements(policy, "Allow"):
            if "Condition" in statement or label.startswith("key"):
                continue
            assert statement["Action"] == ["kms:DescribeKey"], f"{label}: {statement}"


def test_no_policy_uses_wildcard_kms_actions_in_an_allow(module: ModuleFactory) -> None:
    for label, policy in all_policies(module):
        for statement in statements(policy, "Allow"):
            for action in statement["Action"]:
                assert "*" not in action, f"{label}: {action}"


# --- the key policy --------------------------------------------------------------------------


def test_the_key_policy_keeps_account_administration_without_use(module: ModuleFactory) -> None:
    policy = module("kms-key").policy("this")
    (admin,) = [s for s in statements(policy, "Allow") if s["Sid"] == "AccountAdministration"]
    assert principals(admin) == ["arn:aws:iam::123456789012:root"]
    for action in ("kms:PutKeyPolicy", "kms:ScheduleKeyDeletion", "kms:EnableKeyRotation"):
        assert covers(admin, action), action
    for action in (*DATA_PLANE, "kms:CreateGrant"):
        assert not covers(admin, action), f"the root statement delegates {action} to IAM"


def test_the_key_policy_grants_encrypt_to_encryptors_and_decrypt_to_hosts(
    module: ModuleFactory,
) -> None:
    policy = module("kms-key").policy("this")
    for action in ENCRYPTING:
        for statement in allowing(policy, action):
            assert principals(statement) == [CI_ROLE], action
    for action in DECRYPTING:
        for statement in allowing(policy, action):
            assert principals(statement) == [HOST_ROLE], action
    assert allowing(policy, "kms:Encrypt") and allowing(policy, "kms:Decrypt")
    assert not allowing(policy, "kms:ReEncryptFrom")
    assert not allowing(policy, "kms:CreateGrant")


def test_the_key_policy_without_principals_lets_nobody_use_the_key(module: ModuleFactory) -> None:
    policy = module("kms-key", encryptor_principal_arns=[], decryptor_principal_arns=[])
    for action in DATA_PLANE:
        assert not allowing(policy.policy("this"), action), action


def test_the_key_policy_denies_everyone_any_use_without_a_name(module: ModuleFactory) -> None:
    policy = module("kms-key").policy("this")
    (deny,) = statements(policy, "Deny")
    assert deny["Principal"] == {"AWS": ["*"]}
    assert deny["Condition"] == {"Null": {"kms:EncryptionContext:kmskeys_name": ["true"]}}
    for action in DATA_PLANE:
        assert covers(deny, action), action
    assert not covers(deny, "kms:DescribeKey")


def test_the_key_policy_name_patterns_follow_the_inputs(module: ModuleFactory) -> None:
    policy = module(
        "kms-key", encrypt_name_patterns=["web/*"], decrypt_name_patterns=["web/a"]
    ).policy("this")
    (encrypt,) = allowing(policy, "kms:Encrypt")
    (decrypt,) = allowing(policy, "kms:Decrypt")
    assert name_patterns(encrypt) == ["web/*"]
    assert name_patterns(decrypt) == ["web/a"]


def test_one_principal_cannot_be_both_encryptor_and_decryptor(module: ModuleFactory) -> None:
    def precondition_holds(**inputs: Any) -> bool:
        mod = module("kms-key", **inputs)
        (lifecycle,) = mod.resource("aws_kms_key", "this").children("lifecycle")
        (precondition,) = lifecycle.children("precondition")
        return bool(mod.eval(precondition.attributes["condition"]))

    assert precondition_holds()
    assert not precondition_holds(decryptor_principal_arns=[HOST_ROLE, CI_ROLE])


# --- the key itself --------------------------------------------------------------------------


@pytest.mark.parametrize("multi_region", [False, True])
def test_the_key_is_symmetric_rotating_and_aliased(
    module: ModuleFactory, multi_region: bool
) -> None:
    mod = module("kms-key", multi_region=multi_region, deletion_window_in_days=14)
    key = mod.body(mod.resource("aws_kms_key", "this"))
    assert key["customer_master_key_spec"] == "SYMMETRIC_DEFAULT"
    assert key["key_usage"] == "ENCRYPT_DECRYPT"
    assert key["enable_key_rotation"] is True
    assert key["rotation_period_in_days"] == 365
    assert key["deletion_window_in_days"] == 14
    assert key["multi_region"] is multi_region
    assert key["bypass_policy_lockout_safety_check"] is False
    assert '"AccountAdministration"' in key["policy"]
    alias = mod.body(mod.resource("aws_kms_alias", "this"))
    assert alias["name"] == "alias/kmst"
    assert str(alias["target_key_id"]) == "${aws_kms_key.this.key_id}"


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("deletion_window_in_days", 6, False),
        ("deletion_window_in_days", 7, True),
        ("deletion_window_in_days", 31, False),
        ("alias_name", "alias/aws/ebs", False),
        ("alias_name", "kmskeys", False),
        ("alias_name", "alias/kmskeys-prod", True),
        ("rotation_period_in_days", 89, False),
        ("rotation_period_in_days", 2560, True),
    ],
)
def test_key_inputs_are_validated(module: ModuleFactory, name: str, value: Any, ok: bool) -> None:
    mod = module("kms-key", **{name: value})
    assert validation_passes(mod, name) is ok


# --- the GitHub trust ------------------------------------------------------------------------


def test_github_trust_is_bound_to_audience_repository_and_refs(module: ModuleFactory) -> None:
    mod = module(
        "encryptor-role", github_branches=["main", "release/*"], github_environments=["prod"]
    )
    (trust,) = statements(mod.policy("trust"))
    assert trust["Action"] == ["sts:AssumeRoleWithWebIdentity"]
    provider = "arn:aws:iam::123456789012:oidc-provider/token.actions.githubusercontent.com"
    assert trust["Principal"] == {"Federated": [provider]}
    condition = trust["Condition"]
    assert condition["StringEquals"] == {
        "token.actions.githubusercontent.com:aud": ["sts.amazonaws.com"]
    }
    assert condition["StringLike"] == {
        "token.actions.githubusercontent.com:sub": [
            "repo:example-org/app:ref:refs/heads/main",
            "repo:example-org/app:ref:refs/heads/release/*",
            "repo:example-org/app:environment:prod",
        ]
    }


def test_plain_principal_trust_replaces_github(module: ModuleFactory) -> None:
    builder = "arn:aws:iam::123456789012:role/builder"
    mod = module("encryptor-role", github_repository="", trusted_principal_arns=[builder])
    (trust,) = statements(mod.policy("trust"))
    assert trust["Action"] == ["sts:AssumeRole"]
    assert trust["Principal"] == {"AWS": [builder]}


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("github_repository", "example-org/*", False),
        ("github_repository", "example-org", False),
        ("github_repository", "example-org/app", True),
        ("github_branches", ["*"], False),
        ("github_branches", ["main", ""], False),
        ("github_environments", ["*"], False),
    ],
)
def test_github_inputs_cannot_widen_the_trust(
    module: ModuleFactory, name: str, value: Any, ok: bool
) -> None:
    assert validation_passes(module("encryptor-role", **{name: value}), name) is ok


def test_a_role_nobody_can_assume_is_refused(module: ModuleFactory) -> None:
    mod = module("encryptor-role", github_repository="", trusted_principal_arns=[])
    (lifecycle,) = mod.resource("aws_iam_role", "this").children("lifecycle")
    results = [mod.eval(p.attributes["condition"]) for p in lifecycle.children("precondition")]
    assert results[0] is False
