"""Fixtures for the terraform tier: where the modules are, and how to evaluate them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.terraform.hcl_eval import Module

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "terraform"
MODULES = TERRAFORM / "modules"
EXAMPLES = TERRAFORM / "examples"
MODULE_NAMES = ("kms-key", "encryptor-role", "resolver-host")

ACCOUNT = "123456789012"
KEY_ARN = f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
CI_ROLE = f"arn:aws:iam::{ACCOUNT}:role/kmst-ci"
HOST_ROLE = f"arn:aws:iam::{ACCOUNT}:role/kmst-host"

# What data sources answer at plan time in the test account.
KNOWN: dict[str, Any] = {
    "data.aws_partition.current.partition": "aws",
    "data.aws_caller_identity.current.account_id": ACCOUNT,
}

# Required inputs of each module, so that a test only states what it varies.
BASE_INPUTS: dict[str, dict[str, Any]] = {
    "kms-key": {
        "alias_name": "alias/kmst",
        "encryptor_principal_arns": [CI_ROLE],
        "decryptor_principal_arns": [HOST_ROLE],
    },
    "encryptor-role": {
        "name": "kmst-ci",
        "kms_key_arn": KEY_ARN,
        "github_repository": "example-org/app",
    },
    "resolver-host": {
        "name": "kmst-host",
        "kms_key_arn": KEY_ARN,
        "image_id": "ami-0123456789abcdef0",
    },
}

ModuleFactory = Callable[..., Module]


def tf_dirs() -> list[Path]:
    """Every directory under terraform/ that holds .tf files."""
    return sorted({p.parent for p in TERRAFORM.rglob("*.tf")})


@pytest.fixture
def module() -> ModuleFactory:
    """module("kms-key", **inputs) evaluates that module with its base inputs overridden."""

    def load(name: str, **inputs: Any) -> Module:
        return Module(MODULES / name, {**BASE_INPUTS[name], **inputs}, dict(KNOWN))

    return load
