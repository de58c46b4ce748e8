"""Every .tf file parses, and each module has the terraform-aws-modules shape.

Static: python-hcl2 parses the files (no evaluation), so this part runs without terraform.
What the files mean is the real terraform's job (test_cli.py, test_policies.py, test_apply.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hcl2
import pytest

from tests.terraform.conftest import EXAMPLES, MODULE_NAMES, MODULES, TERRAFORM, tf_dirs

pytestmark = pytest.mark.terraform

ALL_TF = sorted(TERRAFORM.rglob("*.tf"))
STANDARD_FILES = ("main.tf", "variables.tf", "outputs.tf", "versions.tf")
DIR_IDS = [str(p.relative_to(TERRAFORM)) for p in tf_dirs()]


def literal(value: Any) -> Any:
    """A parsed HCL literal: python-hcl2 keeps the quotes of strings and labels."""
    if isinstance(value, str) and value.startswith('"') and value.endswith('"'):
        return json.loads(value)
    if isinstance(value, list):
        return [literal(v) for v in value]
    return value


def blocks(directory: Path, kind: str) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every labelled block KIND (variable, output, module) of a directory: name -> (file, body)."""
    found = {}
    for path in sorted(directory.glob("*.tf")):
        with path.open() as f:
            for block in hcl2.load(f).get(kind, []):
                for label, body in block.items():
                    found[literal(label)] = (path, body)
    return found


# Each example and the modules it wires.
EXAMPLE_MODULES = {
    "complete": ["encryptor-role", "kms-key", "resolver-host"],
    "aws-sources": ["fleet-rotation", "kms-key", "resolver-host"],
}


def test_the_tree_has_the_expected_modules_and_examples() -> None:
    assert {p.name for p in MODULES.iterdir() if p.is_dir()} == set(MODULE_NAMES)
    assert {p.name for p in EXAMPLES.iterdir() if p.is_dir()} == set(EXAMPLE_MODULES)
    assert len(ALL_TF) >= 25


@pytest.mark.parametrize("path", ALL_TF, ids=lambda p: str(p.relative_to(TERRAFORM)))
def test_every_tf_file_parses_with_python_hcl2(path: Path) -> None:
    with path.open() as f:
        parsed = hcl2.load(f)
    assert parsed, f"{path} parsed to nothing"


@pytest.mark.parametrize("directory", tf_dirs(), ids=DIR_IDS)
def test_each_module_has_the_four_standard_files(directory: Path) -> None:
    for name in STANDARD_FILES:
        assert (directory / name).is_file(), f"{directory} lacks {name}"


@pytest.mark.parametrize("directory", tf_dirs(), ids=DIR_IDS)
def test_every_variable_is_typed_and_described(directory: Path) -> None:
    variables = blocks(directory, "variable")
    assert variables, f"{directory} declares no variables"
    for name, (path, body) in variables.items():
        assert path.name == "variables.tf", f"var.{name} lives outside variables.tf"
        assert "type" in body, f"var.{name} in {directory} has no type"
        description = literal(body.get("description"))
        assert isinstance(description, str) and len(description) > 10, f"var.{name}"


@pytest.mark.parametrize("directory", tf_dirs(), ids=DIR_IDS)
def test_every_output_is_described_and_wrapped_in_try(directory: Path) -> None:
    outputs = blocks(directory, "output")
    assert outputs, f"{directory} declares no outputs"
    for name, (path, body) in outputs.items():
        assert path.name == "outputs.tf", f"output {name} lives outside outputs.tf"
        assert literal(body.get("description")), f"output {name} has no description"
        value = body["value"]
        assert value.startswith("${try(") and value.endswith(")}"), f"output {name} lacks try()"


@pytest.mark.parametrize("directory", tf_dirs(), ids=DIR_IDS)
def test_versions_pin_terraform_and_the_aws_provider(directory: Path) -> None:
    with (directory / "versions.tf").open() as f:
        (terraform,) = hcl2.load(f)["terraform"]
    assert literal(terraform["required_version"]).startswith(">= 1.5")
    (providers,) = terraform["required_providers"]
    aws = providers["aws"]
    assert literal(aws["source"]) == "hashicorp/aws"
    assert literal(aws["version"]).startswith(">= 5.")


@pytest.mark.parametrize("example", sorted(EXAMPLE_MODULES))
def test_each_example_wires_its_modules_by_relative_source(example: str) -> None:
    calls = blocks(EXAMPLES / example, "module")
    sources = {name: literal(body["source"]) for name, (_, body) in calls.items()}
    for source in sources.values():
        assert source.startswith("../../modules/"), source
        assert (EXAMPLES / example / source).resolve().is_dir(), source
    assert sorted(Path(s).name for s in sources.values()) == EXAMPLE_MODULES[example]


@pytest.mark.parametrize("example", sorted(EXAMPLE_MODULES))
def test_each_example_passes_only_declared_inputs_and_every_required_one(example: str) -> None:
    # terraform validate says the same (test_cli.py); this holds without terraform too.
    for name, (_, body) in blocks(EXAMPLES / example, "module").items():
        target = (EXAMPLES / example / literal(body["source"])).resolve()
        declared = blocks(target, "variable")
        given = set(body) - {"source", "version", "providers", "count", "for_each", "__is_block__"}
        assert given <= set(declared), f"module.{name}: unknown {given - set(declared)}"
        required = {n for n, (_, b) in declared.items() if "default" not in b}
        assert required <= given, f"module.{name}: missing {required - given}"


def test_the_sources_example_gives_the_hosts_its_secret_and_parameter_and_tags_them() -> None:
    calls = {name: body for name, (_, body) in blocks(EXAMPLES / "aws-sources", "module").items()}
    hosts, rotation = calls["hosts"], calls["rotation"]
    assert hosts["secretsmanager_secret_names"] == ["${aws_secretsmanager_secret.db.name}"]
    assert hosts["ssm_parameter_names"] == ["${aws_ssm_parameter.db_password.name}"]
    assert hosts["secrets_kms_key_arns"] == ["${aws_kms_key.secrets.arn}"]
    assert hosts["enable_ssm_agent"] is True
    # The hosts carry the very tag the rotation targets.
    assert "var.fleet_tag_key" in hosts["tags"] and "var.fleet_tag_value" in hosts["tags"]
    assert rotation["target_tag_key"] == "${var.fleet_tag_key}"
    assert rotation["target_tag_value"] == "${var.fleet_tag_value}"


def test_the_example_wires_encrypt_to_ci_and_decrypt_and_seal_to_hosts() -> None:
    calls = {name: body for name, (_, body) in blocks(EXAMPLES / "complete", "module").items()}
    key = calls["kms_key"]
    assert key["encryptor_principal_arns"] == ["${module.encryptor.role_arn}"]
    assert key["decryptor_principal_arns"] == ["${module.web_hosts.role_arn}"]
    assert "module.encryptor" not in key["sealer_principal_arns"]
    assert "module.web_hosts.role_arn" in key["sealer_principal_arns"]
    assert calls["web_hosts"]["seal_key_arn"] == "${module.kms_key.seal_key_arn}"


def test_every_checkov_skip_carries_a_reason() -> None:
    for path in ALL_TF:
        for line in path.read_text().splitlines():
            if "checkov:skip" in line:
                head, _, reason = line.partition("checkov:skip=")[2].partition(":")
                assert head.startswith("CKV"), f"{path}: {line}"
                assert len(reason.strip()) > 20, f"{path}: skip without a real reason: {line}"
