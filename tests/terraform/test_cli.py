"""The real terraform on every module and example: fmt -check, init and validate."""

from __future__ import annotations

from typing import Any

import pytest

from tests.terraform.conftest import TERRAFORM, TF_DIRS, Workspace

pytestmark = pytest.mark.terraform


def test_every_module_and_the_example_are_checked() -> None:
    assert sorted(TF_DIRS) == [
        "examples/aws-sources",
        "examples/complete",
        "modules/encryptor-role",
        "modules/fleet-rotation",
        "modules/kms-key",
        "modules/resolver-host",
    ]


@pytest.mark.parametrize("directory", TF_DIRS)
def test_fmt_check(workspace: Workspace, directory: str) -> None:
    # On the repository's own files: fmt -check reads them and writes nothing.
    done = workspace.tf.run(
        TERRAFORM / directory, "fmt", "-check", "-diff", "-no-color", check=False
    )
    assert done.returncode == 0, f"terraform fmt would change {directory}:\n{done.stdout}"


@pytest.mark.parametrize("directory", TF_DIRS)
def test_init_and_validate(validations: dict[str, dict[str, Any]], directory: str) -> None:
    result = validations[directory]
    assert result["valid"] is True, result["diagnostics"]
    assert result["error_count"] == 0
    assert result["warning_count"] == 0, result["diagnostics"]


def test_init_linked_the_mirrored_provider(workspace: Workspace, validations: object) -> None:
    # init installs from the mirror only, and links the 700 MB provider instead of copying it.
    for directory in TF_DIRS:
        installed = list(
            (workspace.tree / directory / ".terraform" / "providers").glob(
                "registry.terraform.io/hashicorp/aws/*/*"
            )
        )
        assert len(installed) == 1, installed
        assert installed[0].is_symlink()
        assert installed[0].resolve().is_relative_to(workspace.tf.mirror.resolve())
