"""The module inputs the tier plans, and the root module that calls every module with them.

Every variant becomes one `module "LABEL"` call in a generated root module, so one
`terraform plan` renders all of them (one provider start instead of one per variant). Inputs
that a module must refuse go into two other roots: variable validations (reported by module,
from the validate walk) and preconditions (reported by their error message, from the plan walk).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

from tests.support.terraform import moto_provider

ACCOUNT = "123456789012"
REGION = "eu-west-1"
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
SEAL_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/5678abcd-12ab-34cd-56ef-1234567890ab"
SECRETS_KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/9abcabcd-12ab-34cd-56ef-1234567890ab"
CI_ROLE = f"arn:aws:iam::{ACCOUNT}:role/kmst-ci"
HOST_ROLE = f"arn:aws:iam::{ACCOUNT}:role/kmst-host"
BUILDER = f"arn:aws:iam::{ACCOUNT}:role/builder"
# A user that test_moto_iam.py creates in its moto server, trusted by the enc_builder_user role.
MOTO_BUILDER = "kmst-moto-builder"

WHEEL_NAME = "kmskeys-0.1.0-cp311-abi3-manylinux_2_34_x86_64.whl"
WHEEL_BUCKET = "kmst-artifacts"
WHEEL_KEY = f"kmskeys/0.1.0/{WHEEL_NAME}"
S3_WHEEL = f"s3://{WHEEL_BUCKET}/{WHEEL_KEY}"
HTTPS_WHEEL = f"https://artifacts.example.org/kmskeys/{WHEEL_NAME}"


def dummy_wheel() -> bytes:
    """A tiny, byte-for-byte reproducible wheel named like kmskeys', to test what pip checks."""
    files = {
        "kmskeys-0.1.0.dist-info/METADATA": (
            "Metadata-Version: 2.1\nName: kmskeys\nVersion: 0.1.0\nProvides-Extra: resolver\n"
        ),
        "kmskeys-0.1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: kmst\nRoot-Is-Purelib: false\n"
            "Tag: cp311-abi3-manylinux_2_34_x86_64\n"
        ),
        "kmskeys-0.1.0.dist-info/RECORD": "",
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), text)
    return out.getvalue()


WHEEL_SHA256 = hashlib.sha256(dummy_wheel()).hexdigest()
TOML = 'region = "eu-west-1"\n'

# Required inputs of each module, so that a variant only states what it varies.
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
        "kmskeys_wheel": S3_WHEEL,
        "kmskeys_wheel_sha256": WHEEL_SHA256,
    },
    "fleet-rotation": {"name": "kmst-fleet", "target_tag_value": "web"},
}

Variants = dict[str, tuple[str, dict[str, Any]]]

# label -> (module, inputs over BASE_INPUTS); every one must plan.
GOOD: Variants = {
    "enc_default": ("encryptor-role", {}),
    "enc_prefix": ("encryptor-role", {"secret_name_prefix": "web/prod"}),
    "enc_prefix_web": ("encryptor-role", {"secret_name_prefix": "web"}),
    "enc_prefix_dots": ("encryptor-role", {"secret_name_prefix": "a.b"}),
    "enc_plain": ("encryptor-role", {"github_repository": "", "trusted_principal_arns": [BUILDER]}),
    "enc_builder_user": (
        "encryptor-role",
        {
            "github_repository": "",
            "trusted_principal_arns": [f"arn:aws:iam::{ACCOUNT}:user/{MOTO_BUILDER}"],
        },
    ),
    "enc_refs": (
        "encryptor-role",
        {"github_branches": ["main", "release/*"], "github_environments": ["prod"]},
    ),
    "host_default": ("resolver-host", {}),
    "host_names": ("resolver-host", {"allowed_secret_names": ["web/*", "db-password"]}),
    "host_ipv6": ("resolver-host", {"imds_ipv6": True}),
    "host_no_template": ("resolver-host", {"create_launch_template": False}),
    "host_https": (
        "resolver-host",
        {"kmskeys_wheel": HTTPS_WHEEL, "kmskeys_wheel_sha256": None, "resolver_config": TOML},
    ),
    "host_seal": ("resolver-host", {"enable_seal": True, "seal_key_arn": SEAL_ARN}),
    "host_sources": (
        "resolver-host",
        {
            "secretsmanager_secret_names": ["prod/db", "prod/api/*"],
            "ssm_parameter_names": ["/prod/db/password", "/prod/api/*", "plain"],
            "secrets_kms_key_arns": [SECRETS_KEY_ARN],
            "enable_ssm_agent": True,
        },
    ),
    "host_sources_aws_keys": ("resolver-host", {"secretsmanager_secret_names": ["prod/db"]}),
    "host_sources_open": ("resolver-host", {"deny_unlisted_sources": False}),
    "key_default": ("kms-key", {}),
    "key_nobody": ("kms-key", {"encryptor_principal_arns": [], "decryptor_principal_arns": []}),
    "key_patterns": (
        "kms-key",
        {"encrypt_name_patterns": ["web/*"], "decrypt_name_patterns": ["web/a", "web/b"]},
    ),
    "key_multi": ("kms-key", {"multi_region": True, "deletion_window_in_days": 14}),
    "key_bounds": (
        "kms-key",
        {
            "deletion_window_in_days": 7,
            "rotation_period_in_days": 2560,
            "alias_name": "alias/kmskeys-prod",
        },
    ),
    "key_seal": ("kms-key", {"create_seal_key": True, "sealer_principal_arns": [HOST_ROLE]}),
    "fleet_default": ("fleet-rotation", {}),
    "fleet_run_command": (
        "fleet-rotation",
        {"dispatch": "run_command", "secretsmanager_api_calls": ["UpdateSecretVersionStage"]},
    ),
    "fleet_filtered": (
        "fleet-rotation",
        {
            "secret_name_prefixes": ["prod/"],
            "parameter_name_prefixes": ["/prod/"],
            "secretsmanager_path_prefix": "prod/",
            "parameterstore_path_prefix": "prod/",
            "max_concurrency": "5",
            "max_errors": "0",
            "flush_jitter_seconds": 30,
            "kms_rotation_key_arns": [KEY_ARN],
            "kms_rotation_names": ["web/a", "web/b"],
            "custom_event_prefixes": ["kms"],
            "target_tag_key": "team",
        },
    ),
    "fleet_quiet": (
        "fleet-rotation",
        {"secretsmanager_events": False, "parameterstore_events": False, "custom_events": False},
    ),
}

# label -> (module, the one input its variable validation must refuse).
INVALID: Variants = {
    "bad_prefix_star": ("encryptor-role", {"secret_name_prefix": "*"}),
    "bad_prefix_slash": ("encryptor-role", {"secret_name_prefix": "web/"}),
    "bad_prefix_dots": ("encryptor-role", {"secret_name_prefix": "../x"}),
    "bad_repo_wildcard": ("encryptor-role", {"github_repository": "example-org/*"}),
    "bad_repo_owner": ("encryptor-role", {"github_repository": "example-org"}),
    "bad_branch_star": ("encryptor-role", {"github_branches": ["*"]}),
    "bad_branch_empty": ("encryptor-role", {"github_branches": ["main", ""]}),
    "bad_environment_star": ("encryptor-role", {"github_environments": ["*"]}),
    "bad_deletion_6": ("kms-key", {"deletion_window_in_days": 6}),
    "bad_deletion_31": ("kms-key", {"deletion_window_in_days": 31}),
    "bad_alias_aws": ("kms-key", {"alias_name": "alias/aws/ebs"}),
    "bad_alias_bare": ("kms-key", {"alias_name": "kmskeys"}),
    "bad_rotation_89": ("kms-key", {"rotation_period_in_days": 89}),
    "bad_host_names": ("resolver-host", {"allowed_secret_names": []}),
    "bad_wheel_http": ("resolver-host", {"kmskeys_wheel": f"http://example.org/{WHEEL_NAME}"}),
    "bad_wheel_sdist": ("resolver-host", {"kmskeys_wheel": f"s3://{WHEEL_BUCKET}/kmskeys.tar.gz"}),
    "bad_wheel_other": ("resolver-host", {"kmskeys_wheel": f"s3://{WHEEL_BUCKET}/boto3-1-py3.whl"}),
    "bad_wheel_sha": ("resolver-host", {"kmskeys_wheel_sha256": "abc"}),
    "bad_host_secret_star": ("resolver-host", {"secretsmanager_secret_names": ["*"]}),
    "bad_host_param_star": ("resolver-host", {"ssm_parameter_names": ["/*"]}),
    "bad_host_secrets_key": ("resolver-host", {"secrets_kms_key_arns": ["alias/aws/ssm"]}),
    "bad_fleet_name_aws": ("fleet-rotation", {"name": "AWS-kmskeys"}),
    "bad_fleet_name_space": ("fleet-rotation", {"name": "kmst fleet"}),
    "bad_fleet_dispatch": ("fleet-rotation", {"dispatch": "lambda"}),
    "bad_fleet_concurrency": ("fleet-rotation", {"max_concurrency": "0"}),
    "bad_fleet_concurrency_pct": ("fleet-rotation", {"max_concurrency": "101%"}),
    "bad_fleet_errors": ("fleet-rotation", {"max_errors": "-1"}),
    "bad_fleet_path_shell": ("fleet-rotation", {"kmskeys_path": "/usr/bin/kmskeys;id"}),
    "bad_fleet_path_relative": ("fleet-rotation", {"kmskeys_path": "kmskeys"}),
    "bad_fleet_jitter": ("fleet-rotation", {"flush_jitter_seconds": 601}),
    "bad_fleet_prefix": ("fleet-rotation", {"secretsmanager_prefix": "SM"}),
    "bad_fleet_path_prefix": ("fleet-rotation", {"parameterstore_path_prefix": "prod"}),
    "bad_fleet_api_call": ("fleet-rotation", {"secretsmanager_api_calls": ["GetSecretValue"]}),
    "bad_fleet_kms_names": ("fleet-rotation", {"kms_rotation_names": ["../x"]}),
    "bad_fleet_tag": ("fleet-rotation", {"target_tag_value": "web *"}),
    "bad_fleet_custom_prefix": ("fleet-rotation", {"custom_event_prefixes": ["kms;id"]}),
}

# label -> (module, inputs, what the condition of the precondition that must fail refers to).
# A precondition's diagnostic names the resource and shows the condition, not the module call.
PRECONDITION: dict[str, tuple[str, dict[str, Any], str]] = {
    "nobody_assumes": (
        "encryptor-role",
        {"github_repository": "", "trusted_principal_arns": []},
        "var.trusted_principal_arns",
    ),
    "no_refs": (
        "encryptor-role",
        {"github_branches": [], "github_environments": []},
        "local.github_subjects",
    ),
    "both_roles": (
        "kms-key",
        {"decryptor_principal_arns": [HOST_ROLE, CI_ROLE]},
        "var.decryptor_principal_arns",
    ),
    "no_image": ("resolver-host", {"image_id": None}, "var.image_id"),
    "no_wheel": ("resolver-host", {"kmskeys_wheel": None}, "var.kmskeys_wheel"),
    "seal_without_key": ("resolver-host", {"enable_seal": True}, "var.seal_key_arn"),
    "rate_controls_run_command": (
        "fleet-rotation",
        {"dispatch": "run_command", "max_concurrency": "5"},
        "var.max_concurrency",
    ),
    "kms_keys_without_names": (
        "fleet-rotation",
        {"kms_rotation_key_arns": [KEY_ARN]},
        "var.kms_rotation_key_arns",
    ),
}


def hcl(value: Any) -> str:
    """A Python value as an HCL expression (JSON literals are HCL; templates are escaped)."""
    return json.dumps(value).replace("${", "$${").replace("%{", "%%{")


def root_module(
    tree: Path, here: Path, calls: dict[str, tuple[str, dict[str, Any]]], url: str
) -> str:
    """main.tf of a root that calls each module of `tree` once per label, against moto.

    Each call's outputs become the root output LABEL.
    """
    parts = [moto_provider(url, REGION)]
    for label, (name, inputs) in calls.items():
        source = Path("..") / tree.relative_to(here.parent) / "modules" / name
        lines = [f'module "{label}" {{', f"  source = {hcl(str(source))}"]
        lines += [f"  {k} = {hcl(v)}" for k, v in {**BASE_INPUTS[name], **inputs}.items()]
        parts.append("\n".join([*lines, "}\n"]))
        # Every output of the call, as one object: what a caller of the module would read.
        parts.append(f'output "{label}" {{\n  value = module.{label}\n}}\n')
    return "\n".join(parts)
