"""examples/complete as terraform applied it to moto: the state `make demo-terraform` left.

The tier applies the example once per session, through the demo (tests/terraform/conftest.py,
DemoRun), with the seal key on and an s3:// wheel. These tests read `terraform show -json` of
that state: the policies as rendered with the real ARNs moto handed out, the launch template,
and the outputs the demo used. The demo itself checks that the roles work and that destroy
removed everything (test_demo.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from scripts.demo_terraform import EXAMPLE_INPUTS
from tests.terraform.conftest import DemoRun
from tests.terraform.policy import (
    allowing,
    denied_on_every_key_but,
    name_patterns,
    principals,
    requires_host_binding,
    statements,
    unconditionally_denied,
)
from tests.terraform.rendered import Rendered, cloud_config

pytestmark = [pytest.mark.terraform, pytest.mark.upcall]

EXPECTED = {
    "module.encryptor.aws_iam_role.this",
    "module.encryptor.aws_iam_role_policy.kms",
    "module.kms_key.aws_kms_alias.seal[0]",
    "module.kms_key.aws_kms_alias.this",
    "module.kms_key.aws_kms_key.seal[0]",
    "module.kms_key.aws_kms_key.this",
    "module.web_hosts.aws_iam_instance_profile.this",
    "module.web_hosts.aws_iam_role.this",
    "module.web_hosts.aws_iam_role_policy.kms",
    # deny_unlisted_sources (on by default): the complete example's hosts read no secret of
    # Secrets Manager or Parameter Store, even if a broader policy is attached later.
    "module.web_hosts.aws_iam_role_policy.sources[0]",
    "module.web_hosts.aws_iam_role_policy.wheel[0]",
    "module.web_hosts.aws_launch_template.this[0]",
}


@pytest.fixture(scope="module")
def state(demo_run: DemoRun) -> Rendered:
    if demo_run.state is None:
        pytest.fail(f"the demo applied nothing:\n{demo_run.output[-3000:]}", pytrace=False)
    return demo_run.state


def arn(state: Rendered, address: str) -> str:
    return str(state.values(address)["arn"])


def outputs(state: Rendered) -> dict[str, Any]:
    return {k: v["value"] for k, v in state.shown["values"]["outputs"].items()}


def test_apply_created_every_resource_of_the_example(state: Rendered) -> None:
    assert state.addresses("managed") == EXPECTED


def test_the_outputs_name_what_was_created(state: Rendered) -> None:
    out = outputs(state)
    assert out["key_arn"] == arn(state, "module.kms_key.aws_kms_key.this")
    assert out["seal_key_arn"] == arn(state, "module.kms_key.aws_kms_key.seal[0]")
    assert out["ci_role_arn"] == arn(state, "module.encryptor.aws_iam_role.this")
    assert out["host_role_arn"] == arn(state, "module.web_hosts.aws_iam_role.this")
    assert (
        out["key_alias"] == f"alias/{state.values('module.kms_key.aws_kms_alias.this')['name'][6:]}"
    )
    assert (
        out["host_launch_template_id"]
        == state.values("module.web_hosts.aws_launch_template.this[0]")["id"]
    )
    assert out["seal_key_arn"] != out["key_arn"]


def test_the_key_lets_the_created_ci_role_encrypt_and_host_role_decrypt(state: Rendered) -> None:
    policy = state.policy("module.kms_key.aws_kms_key.this")
    ci = arn(state, "module.encryptor.aws_iam_role.this")
    host = arn(state, "module.web_hosts.aws_iam_role.this")
    (encrypt,) = allowing(policy, "kms:Encrypt")
    (decrypt,) = allowing(policy, "kms:Decrypt")
    assert principals(encrypt) == [ci]
    assert principals(decrypt) == [host]
    assert name_patterns(encrypt) == name_patterns(decrypt) == ["web/*"]


def test_the_ci_role_policy_names_the_created_key(state: Rendered) -> None:
    policy = state.policy("module.encryptor.aws_iam_role_policy.kms")
    key = arn(state, "module.kms_key.aws_kms_key.this")
    (encrypt,) = allowing(policy, "kms:Encrypt")
    assert encrypt["Resource"] == [key]
    assert name_patterns(encrypt) == ["web/*"]
    assert unconditionally_denied(policy, "kms:Decrypt")


def test_the_host_role_decrypts_the_key_and_seals_only_under_the_seal_key(
    state: Rendered,
) -> None:
    policy = state.policy("module.web_hosts.aws_iam_role_policy.kms")
    key = arn(state, "module.kms_key.aws_kms_key.this")
    seal_key = arn(state, "module.kms_key.aws_kms_key.seal[0]")
    by_sid = {s["Sid"]: s for s in statements(policy)}
    assert by_sid["DecryptWithNameBinding"]["Resource"] == [key]
    assert by_sid["SealWithHostBinding"]["Resource"] == [seal_key]
    assert requires_host_binding(by_sid["SealWithHostBinding"])
    for action in ("kms:Encrypt", "kms:GenerateDataKey", "kms:ReEncryptTo", "kms:CreateGrant"):
        assert denied_on_every_key_but(policy, action, seal_key), action


def test_the_seal_key_lets_only_the_created_host_role_seal(state: Rendered) -> None:
    policy = state.policy("module.kms_key.aws_kms_key.seal[0]")
    (seal,) = [s for s in statements(policy, "Allow") if s["Sid"] == "SealWithHostBinding"]
    assert principals(seal) == [arn(state, "module.web_hosts.aws_iam_role.this")]
    assert requires_host_binding(seal)
    alias = state.values("module.kms_key.aws_kms_alias.seal[0]")
    assert alias["name"] == outputs(state)["key_alias"] + "-seal"


def test_the_host_may_fetch_exactly_the_wheel_object(state: Rendered) -> None:
    (fetch,) = statements(state.policy("module.web_hosts.aws_iam_role_policy.wheel[0]"))
    bucket_key = EXAMPLE_INPUTS["kmskeys_wheel"].removeprefix("s3://")
    assert fetch["Effect"] == "Allow"
    assert fetch["Action"] == ["s3:GetObject"]
    assert fetch["Resource"] == [f"arn:aws:s3:::{bucket_key}"]
    assert "Condition" not in fetch


def test_the_launch_template_is_hardened_and_installs_for_the_created_key(
    state: Rendered,
) -> None:
    template = state.values("module.web_hosts.aws_launch_template.this[0]")
    (options,) = template["metadata_options"]
    assert options["http_tokens"] == "required"
    assert options["http_put_response_hop_limit"] == 1
    (profile,) = template["iam_instance_profile"]
    assert profile["arn"] == arn(state, "module.web_hosts.aws_iam_instance_profile.this")
    runcmd = cloud_config(template["user_data"])["runcmd"]
    key = arn(state, "module.kms_key.aws_kms_key.this")
    assert ["/usr/local/sbin/kmskeys-resolver", "install", "--key-arn", key] in runcmd
    (fetch,) = [
        step for step in runcmd if step[:2] == ["/opt/kmskeys/bin/python", "-c"] and "s3" in step[2]
    ]
    bucket, _, object_key = EXAMPLE_INPUTS["kmskeys_wheel"].removeprefix("s3://").partition("/")
    assert fetch[3:] == [
        bucket,
        object_key,
        f"/opt/kmskeys/dist/{object_key.rsplit('/', 1)[1]}",
        "us-east-1",
    ]
