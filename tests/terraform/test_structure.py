"""Every .tf file parses, and each module has the terraform-aws-modules shape."""

from __future__ import annotations

from pathlib import Path

import hcl2
import pytest

from tests.terraform.conftest import EXAMPLES, MODULE_NAMES, MODULES, TERRAFORM, tf_dirs
from tests.terraform.hcl_eval import Module

pytestmark = pytest.mark.terraform

ALL_TF = sorted(TERRAFORM.rglob("*.tf"))
STANDARD_FILES = ("main.tf", "variables.tf", "outputs.tf", "versions.tf")


def test_the_tree_has_the_expected_modules_and_example() -> None:
    assert {p.name for p in MODULES.iterdir() if p.is_dir()} == set(MODULE_NAMES)
    assert (EXAMPLES / "complete").is_dir()
    assert len(ALL_TF) >= 16


@pytest.mark.parametrize("path", ALL_TF, ids=lambda p: str(p.relative_to(TERRAFORM)))
def test_every_tf_file_parses_with_python_hcl2(path: Path) -> None:
    with path.open() as f:
        parsed = hcl2.load(f)
    assert parsed, f"{path} parsed to nothing"


@pytest.mark.parametrize("directory", tf_dirs(), ids=lambda p: str(p.relative_to(TERRAFORM)))
def test_each_module_has_the_four_standard_files(directory: Path) -> None:
    for name in STANDARD_FILES:
        assert (directory / name).is_file(), f"{directory} lacks {name}"


@pytest.mark.parametrize("directory", tf_dirs(), ids=lambda p: str(p.relative_to(TERRAFORM)))
def test_every_variable_is_typed_and_described(directory: Path) -> None:
    module = Module(directory)
    variables = module.variables()
    assert variables, f"{directory} declares no variables"
    for name, block in variables.items():
        assert block.file.name == "variables.tf", f"var.{name} lives outside variables.tf"
        assert "type" in block.attributes, f"var.{name} in {directory} has no type"
        assert "description" in block.attributes, f"var.{name} in {directory} has no description"
        description = module.eval(block.attributes["description"])
        assert isinstance(description, str) and len(description) > 10, f"var.{name}"


@pytest.mark.parametrize("directory", tf_dirs(), ids=lambda p: str(p.relative_to(TERRAFORM)))
def test_every_output_is_described_and_wrapped_in_try(directory: Path) -> None:
    module = Module(directory)
    outputs = module.outputs()
    assert outputs, f"{directory} declares no outputs"
    for name, block in outputs.items():
        assert block.file.name == "outputs.tf", f"output {name} lives outside outputs.tf"
        assert "description" in block.attributes, f"output {name} has no description"
        value = block.attributes["value"]
        call = value.children[0] if value.data == "expr_term" else value
        assert call.data == "function_call", f"output {name} is not a function call"
        assert str(next(call.scan_values(lambda _: True))) == "try", f"output {name} lacks try()"


@pytest.mark.parametrize("directory", tf_dirs(), ids=lambda p: str(p.relative_to(TERRAFORM)))
def test_versions_pin_terraform_and_the_aws_provider(directory: Path) -> None:
    module = Module(directory)
    (terraform,) = module.of_type("terraform")
    assert module.eval(terraform.attributes["required_version"]).startswith(">= 1.5")
    (providers,) = terraform.children("required_providers")
    aws = module.eval(providers.attributes["aws"])
    assert aws["source"] == "hashicorp/aws"
    assert aws["version"].startswith(">= 5.")


def test_the_example_wires_every_module_by_relative_source() -> None:
    example = Module(EXAMPLES / "complete")
    calls = example.of_type("module")
    sources = {}
    for call in calls:
        source = example.eval(call.attributes["source"])
        sources[call.labels[0]] = source
        assert source.startswith("../../modules/"), source
        assert (EXAMPLES / "complete" / source).resolve().is_dir(), source
    assert sorted(Path(s).name for s in sources.values()) == sorted(MODULE_NAMES)


def test_the_example_passes_only_declared_inputs_and_every_required_one() -> None:
    example = Module(EXAMPLES / "complete")
    for call in example.of_type("module"):
        target = Module((EXAMPLES / "complete" / example.eval(call.attributes["source"])).resolve())
        declared = target.variables()
        given = set(call.attributes) - {"source", "version", "providers", "count", "for_each"}
        assert given <= set(declared), f"module.{call.labels[0]}: unknown {given - set(declared)}"
        required = {n for n, b in declared.items() if "default" not in b.attributes}
        assert required <= given, f"module.{call.labels[0]}: missing {required - given}"


def test_the_example_grants_encrypt_to_ci_and_decrypt_to_hosts_only() -> None:
    example = Module(EXAMPLES / "complete", {"github_repository": "o/r", "image_id": "ami-1"})
    calls = {c.labels[0]: example.body(c) for c in example.of_type("module")}
    key = calls["kms_key"]
    assert [str(a) for a in key["encryptor_principal_arns"]] == ["${module.encryptor.role_arn}"]
    assert [str(a) for a in key["decryptor_principal_arns"]] == ["${module.web_hosts.role_arn}"]
    assert key["encrypt_name_patterns"] == ["web/*"]
    assert calls["web_hosts"]["allowed_secret_names"] == ["web/*"]
    assert calls["encryptor"]["secret_name_prefix"] == "web"


def test_every_checkov_skip_carries_a_reason() -> None:
    for path in ALL_TF:
        for line in path.read_text().splitlines():
            if "checkov:skip" in line:
                head, _, reason = line.partition("checkov:skip=")[2].partition(":")
                assert head.startswith("CKV"), f"{path}: {line}"
                assert len(reason.strip()) > 20, f"{path}: skip without a real reason: {line}"
