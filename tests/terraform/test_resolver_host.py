"""The resolver host as planned: IMDSv2 with hop limit 1, and cloud-init that installs the wheel.

The launch templates and their user data come from the tier's plan of every variant; the
snippets cloud-init would run are run here too, against this checkout and the session's moto.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.kms_emulator import TEST_CREDENTIALS
from tests.terraform.conftest import REPO, Workspace, policy_of, resource_of
from tests.terraform.policy import statements
from tests.terraform.rendered import Rendered, cloud_config
from tests.terraform.variants import (
    HTTPS_WHEEL,
    KEY_ARN,
    REGION,
    TOML,
    WHEEL_BUCKET,
    WHEEL_KEY,
    WHEEL_NAME,
    WHEEL_SHA256,
    dummy_wheel,
)

pytestmark = pytest.mark.terraform

TEMPLATE = "aws_launch_template.this[0]"
PIP = ["/opt/kmskeys/bin/pip", "install", "--no-input", "--only-binary=:all:"]
WHEEL_FILE = f"/opt/kmskeys/dist/{WHEEL_NAME}"


def template(plan: Rendered, label: str) -> dict[str, Any]:
    return resource_of(plan, label, TEMPLATE)


def runcmd(plan: Rendered, label: str) -> list[list[str]]:
    steps: list[list[str]] = cloud_config(template(plan, label)["user_data"])["runcmd"]
    return steps


def python_snippet(steps: list[list[str]], needle: str) -> list[str]:
    (step,) = [s for s in steps if s[:2] == ["/opt/kmskeys/bin/python", "-c"] and needle in s[2]]
    return step


@pytest.mark.parametrize(("label", "ipv6"), [("host_default", False), ("host_ipv6", True)])
def test_imdsv2_is_required_with_hop_limit_one(good_plan: Rendered, label: str, ipv6: bool) -> None:
    (options,) = template(good_plan, label)["metadata_options"]
    assert options["http_tokens"] == "required"
    assert options["http_put_response_hop_limit"] == 1
    assert options["http_endpoint"] == "enabled"
    assert options["http_protocol_ipv6"] == ("enabled" if ipv6 else "disabled")
    assert options["instance_metadata_tags"] == "disabled"


def test_hosts_get_the_decrypt_only_instance_profile(good_plan: Rendered) -> None:
    # The ARNs exist only after apply; the plan links them by reference (test_apply.py checks
    # the applied values). Here: the profile is there, and the role policy is the Decrypt one.
    assert good_plan.has(f"module.host_default.{TEMPLATE}")
    assert resource_of(good_plan, "host_default", "aws_iam_instance_profile.this")["name"] == (
        "kmst-host"
    )
    role_policy = resource_of(good_plan, "host_default", "aws_iam_role_policy.kms")
    assert role_policy["name"] == "kmskeys-decrypt"
    assert '"kms:Decrypt"' in role_policy["policy"]


def test_the_root_volume_is_encrypted(good_plan: Rendered) -> None:
    (device,) = template(good_plan, "host_default")["block_device_mappings"]
    (ebs,) = device["ebs"]
    assert ebs["encrypted"] == "true"  # the provider's schema types it as a string
    assert ebs["volume_type"] == "gp3"


def test_the_launch_template_is_optional(good_plan: Rendered) -> None:
    assert not good_plan.has(f"module.host_no_template.{TEMPLATE}")
    assert good_plan.has("module.host_no_template.aws_iam_instance_profile.this")


def test_cloud_init_installs_keyutils_and_a_venv(good_plan: Rendered) -> None:
    config = cloud_config(template(good_plan, "host_default")["user_data"])
    assert config["packages"] == ["keyutils", "python3-venv", "nftables"]
    # No compiler and no headers: nothing is ever built on the host.
    assert not {"gcc", "build-essential", "libkeyutils-dev", "python3-dev"} & set(
        config["packages"]
    )


def test_cloud_init_fetches_the_s3_wheel_with_the_instance_role(good_plan: Rendered) -> None:
    steps = runcmd(good_plan, "host_default")
    assert steps[0] == ["python3", "-m", "venv", "/opt/kmskeys"]
    assert steps[1] == ["install", "-d", "-m", "0755", "/opt/kmskeys/dist"]
    assert steps[2] == [*PIP, "botocore"]
    fetch = python_snippet(steps, "get_object")
    assert fetch[3:] == [WHEEL_BUCKET, WHEEL_KEY, WHEEL_FILE, REGION]
    requirement = f"kmskeys[resolver] @ file://{WHEEL_FILE}#sha256={WHEEL_SHA256}"
    assert steps[4] == [*PIP, requirement]


def test_the_s3_wheel_gets_exactly_one_object_and_nothing_else(good_plan: Rendered) -> None:
    (fetch,) = statements(policy_of(good_plan, "host_default", "wheel[0]"))
    assert fetch["Action"] == ["s3:GetObject"]
    assert fetch["Resource"] == [f"arn:aws:s3:::{WHEEL_BUCKET}/{WHEEL_KEY}"]
    assert good_plan.policy("module.host_default.aws_iam_role_policy.wheel[0]") == policy_of(
        good_plan, "host_default", "wheel[0]"
    )
    # An https:// wheel needs no S3 permission at all.
    assert not good_plan.has("module.host_https.aws_iam_role_policy.wheel[0]")
    assert not good_plan.has("module.host_https.data.aws_iam_policy_document.wheel[0]")


def test_an_https_wheel_is_installed_straight_from_its_url(good_plan: Rendered) -> None:
    steps = runcmd(good_plan, "host_https")
    assert steps[:2] == [
        ["python3", "-m", "venv", "/opt/kmskeys"],
        [*PIP, f"kmskeys[resolver] @ {HTTPS_WHEEL}"],
    ]
    assert not any("get_object" in " ".join(s) for s in steps)


def test_cloud_init_installs_then_firewalls_then_enables_the_unit(good_plan: Rendered) -> None:
    steps = [" ".join(step) for step in runcmd(good_plan, "host_default")]
    order = [
        f"{' '.join(PIP)} kmskeys[resolver] @ file://{WHEEL_FILE}#sha256={WHEEL_SHA256}",
        "ln -sf /opt/kmskeys/bin/kmskeys-resolver /usr/local/sbin/kmskeys-resolver",
        f"/usr/local/sbin/kmskeys-resolver install --key-arn {KEY_ARN}",
        "/usr/local/sbin/kmskeys-resolver firewall apply",
        "systemctl daemon-reload",
        "systemctl enable --now kmskeys-firewall.service",
    ]
    positions = [steps.index(s) for s in order]
    assert positions == sorted(positions)


def test_the_s3_fetch_snippet_downloads_the_object(
    good_plan: Rendered, workspace: Workspace, tmp_path: Path
) -> None:
    # The very snippet, against the session's moto S3, with botocore from this venv.
    fetch = python_snippet(runcmd(good_plan, "host_default"), "get_object")
    s3 = workspace.moto.client("s3")
    s3.create_bucket(Bucket=WHEEL_BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_object(Bucket=WHEEL_BUCKET, Key=WHEEL_KEY, Body=dummy_wheel())
    dest = tmp_path / WHEEL_NAME
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        **TEST_CREDENTIALS,
        "AWS_ENDPOINT_URL": workspace.moto.url,
    }
    args = [*fetch[3:5], str(dest), fetch[6]]
    subprocess.run([sys.executable, "-c", fetch[2], *args], check=True, env=env, timeout=60)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == WHEEL_SHA256


@pytest.mark.parametrize("tampered", [False, True])
def test_pip_refuses_a_wheel_whose_digest_differs(
    good_plan: Rendered, tmp_path: Path, tampered: bool
) -> None:
    # The rendered pip step, with `download` for `install` and the wheel moved to tmp_path.
    step = runcmd(good_plan, "host_default")[4]
    requirement = step[-1].replace("/opt/kmskeys/dist", str(tmp_path))
    wheel = dummy_wheel()
    (tmp_path / WHEEL_NAME).write_bytes(wheel[:-1] + b"\x01" if tampered else wheel)
    options = step[2:-1]
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-index"]
    done = subprocess.run(
        [*pip, "-d", str(tmp_path / "got"), *options, requirement],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if tampered:
        assert done.returncode != 0
        assert "HASHES" in done.stderr.upper(), done.stderr
    else:
        assert done.returncode == 0, done.stderr


def test_cloud_init_installs_the_firewall_unit_the_resolver_ships(
    good_plan: Rendered, tmp_path: Path
) -> None:
    copy = python_snippet(runcmd(good_plan, "host_default"), "importlib.resources")
    target = "/etc/systemd/system/kmskeys-firewall.service"
    assert f"'{target}'" in copy[2]
    # Run the very snippet with this venv's installed kmskeys, the target moved to tmp_path.
    moved = tmp_path / "kmskeys-firewall.service"
    snippet = copy[2].replace(target, str(moved))
    subprocess.run([sys.executable, "-c", snippet], check=True, cwd=tmp_path, timeout=60)
    shipped = REPO / "resolver" / "data" / "kmskeys-firewall.service"
    assert moved.read_bytes() == shipped.read_bytes()
    assert "kmskeys-resolver firewall apply" in moved.read_text()


def test_resolver_config_is_written_root_only_when_given(good_plan: Rendered) -> None:
    assert cloud_config(template(good_plan, "host_default")["user_data"])["write_files"] == []
    (written,) = cloud_config(template(good_plan, "host_https")["user_data"])["write_files"]
    assert written == {
        "path": "/etc/kmskeys/resolver.toml",
        "owner": "root:root",
        "permissions": "0600",
        "content": TOML,
    }


def test_the_user_data_output_is_what_the_template_runs(good_plan: Rendered) -> None:
    # The call's outputs are partly unknown before apply (role ARNs), so the plan lists them
    # as a change; user_data itself is known.
    change = good_plan.shown["output_changes"]["host_default"]
    assert change["after_unknown"].get("user_data") is not True
    output = change["after"]["user_data"]
    assert output.startswith("#cloud-config\n")
    assert base64.b64decode(template(good_plan, "host_default")["user_data"]).decode() == output
