"""The resolver host: IMDSv2 with hop limit 1, and cloud-init that installs the resolver."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.terraform.conftest import REPO, ModuleFactory
from tests.terraform.hcl_eval import Module

pytestmark = pytest.mark.terraform


def launch_template(mod: Module) -> dict[str, Any]:
    return mod.body(mod.resource("aws_launch_template", "this"))


def cloud_config(mod: Module) -> dict[str, Any]:
    text = base64.b64decode(launch_template(mod)["user_data"]).decode()
    first, _, rest = text.partition("\n")
    assert first == "#cloud-config", "cloud-init only reads user data that starts so"
    parsed = yaml.safe_load(rest)
    assert isinstance(parsed, dict)
    return parsed


@pytest.mark.parametrize("imds_ipv6", [False, True])
def test_imdsv2_is_required_with_hop_limit_one(module: ModuleFactory, imds_ipv6: bool) -> None:
    (options,) = launch_template(module("resolver-host", imds_ipv6=imds_ipv6))["metadata_options"]
    assert options["http_tokens"] == "required"
    assert options["http_put_response_hop_limit"] == 1
    assert options["http_endpoint"] == "enabled"
    assert options["http_protocol_ipv6"] == ("enabled" if imds_ipv6 else "disabled")
    assert options["instance_metadata_tags"] == "disabled"


def test_hosts_get_the_decrypt_only_instance_profile(module: ModuleFactory) -> None:
    mod = module("resolver-host")
    (profile,) = launch_template(mod)["iam_instance_profile"]
    assert str(profile["arn"]) == "${aws_iam_instance_profile.this.arn}"
    instance_profile = mod.body(mod.resource("aws_iam_instance_profile", "this"))
    assert str(instance_profile["role"]) == "${aws_iam_role.this.name}"
    role_policy = mod.body(mod.resource("aws_iam_role_policy", "kms"))
    assert str(role_policy["role"]) == "${aws_iam_role.this.id}"
    assert '"kms:Decrypt"' in role_policy["policy"]


def test_the_root_volume_is_encrypted(module: ModuleFactory) -> None:
    (device,) = launch_template(module("resolver-host"))["block_device_mappings"]
    (ebs,) = device["ebs"]
    assert ebs["encrypted"] is True


def test_the_launch_template_is_optional(module: ModuleFactory) -> None:
    mod = module("resolver-host", create_launch_template=False)
    count = mod.eval(mod.resource("aws_launch_template", "this").attributes["count"])
    assert count == 0
    assert mod.eval(mod.outputs()["launch_template_id"].attributes["value"]) is not None


def test_cloud_init_installs_keyutils_and_the_resolver(module: ModuleFactory) -> None:
    config = cloud_config(module("resolver-host", kmskeys_requirement="kmskeys[resolver]==0.1.0"))
    assert "keyutils" in config["packages"]
    assert "python3-venv" in config["packages"]
    runcmd = [" ".join(step) for step in config["runcmd"]]
    assert "/opt/kmskeys/bin/pip install --no-input kmskeys[resolver]==0.1.0" in runcmd


def test_cloud_init_installs_then_firewalls_then_enables_the_unit(module: ModuleFactory) -> None:
    runcmd = [" ".join(step) for step in cloud_config(module("resolver-host"))["runcmd"]]
    steps = [
        "ln -sf /opt/kmskeys/bin/kmskeys-resolver /usr/local/sbin/kmskeys-resolver",
        "/usr/local/sbin/kmskeys-resolver install",
        "/usr/local/sbin/kmskeys-resolver firewall apply",
        "systemctl daemon-reload",
        "systemctl enable --now kmskeys-firewall.service",
    ]
    positions = [runcmd.index(s) for s in steps]
    assert positions == sorted(positions)


def test_cloud_init_installs_the_firewall_unit_the_resolver_ships(
    module: ModuleFactory, tmp_path: Path
) -> None:
    (copy,) = [s for s in cloud_config(module("resolver-host"))["runcmd"] if s[1:2] == ["-c"]]
    assert copy[0] == "/opt/kmskeys/bin/python"
    target = "/etc/systemd/system/kmskeys-firewall.service"
    assert f"'{target}'" in copy[2]
    # Run the very snippet with this venv's installed kmskeys, the target moved to tmp_path.
    moved = tmp_path / "kmskeys-firewall.service"
    snippet = copy[2].replace(target, str(moved))
    subprocess.run([sys.executable, "-c", snippet], check=True, cwd=tmp_path, timeout=60)
    shipped = REPO / "resolver" / "data" / "kmskeys-firewall.service"
    assert moved.read_bytes() == shipped.read_bytes()
    assert "kmskeys-resolver firewall apply" in moved.read_text()


def test_resolver_config_is_written_root_only_when_given(module: ModuleFactory) -> None:
    assert cloud_config(module("resolver-host"))["write_files"] == []
    toml = 'region = "eu-west-1"\n'
    (written,) = cloud_config(module("resolver-host", resolver_config=toml))["write_files"]
    assert written == {
        "path": "/etc/kmskeys/resolver.toml",
        "owner": "root:root",
        "permissions": "0600",
        "content": toml,
    }


def test_the_user_data_output_is_what_the_template_runs(module: ModuleFactory) -> None:
    mod = module("resolver-host")
    output = mod.eval(mod.outputs()["user_data"].attributes["value"])
    assert base64.b64decode(launch_template(mod)["user_data"]).decode() == output


def test_the_requirement_must_be_the_resolver_extra(module: ModuleFactory) -> None:
    mod = module("resolver-host", kmskeys_requirement="kmskeys")
    (validation,) = mod.variables()["kmskeys_requirement"].children("validation")
    assert mod.eval(validation.attributes["condition"]) is False
