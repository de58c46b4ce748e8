"""examples/ci/github-actions.yml: valid YAML, the real CLI's options, and a step that works.

The workflow cannot run GitHub here, but its `kmskeys` step can: it runs under bash against the
emulator, and the blobs it writes resolve through a real resolver install.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kmskeys import get_secret
from tests.examples.conftest import BIN, EXAMPLES
from tests.support.kms_emulator import TEST_CREDENTIALS
from tests.upcall.conftest import Install

pytestmark = pytest.mark.examples

WORKFLOW = EXAMPLES / "ci" / "github-actions.yml"
SHELL_OPERATORS = {"|", "||", "&&", ";", ";;", "&", "(", ")", ">", "<", ">>"}


def workflow() -> dict[Any, Any]:
    doc = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(doc, dict)
    return doc


def steps() -> list[dict[str, Any]]:
    jobs = workflow()["jobs"]
    return [step for job in jobs.values() for step in job["steps"]]


def step_using(action: str) -> dict[str, Any]:
    found = [s for s in steps() if str(s.get("uses", "")).startswith(action + "@")]
    assert len(found) == 1, f"expected one step using {action}"
    return found[0]


def bundle_step() -> dict[str, Any]:
    found = [s for s in steps() if "kmskeys bundle" in s.get("run", "")]
    assert len(found) == 1
    return found[0]


def kmskeys_commands() -> list[list[str]]:
    """Every `kmskeys SUBCOMMAND ...` in the workflow's run scripts, up to a shell operator."""
    commands = []
    for step in steps():
        for line in step.get("run", "").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words = list(lexer)
            for i, word in enumerate(words):
                if word == "kmskeys":
                    rest = words[i + 1 :]
                    end = next((j for j, w in enumerate(rest) if w in SHELL_OPERATORS), len(rest))
                    commands.append(rest[:end])
    return commands


def test_workflow_is_valid_yaml_with_the_expected_shape() -> None:
    doc = workflow()
    triggers = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "workflow_dispatch" in triggers
    assert doc["permissions"] == {"id-token": "write", "contents": "read"}
    job = next(iter(doc["jobs"].values()))
    assert job["environment"] == "${{ inputs.environment }}"


def test_credentials_come_from_an_oidc_role() -> None:
    step = step_using("aws-actions/configure-aws-credentials")
    assert step["with"]["role-to-assume"].startswith("${{ vars.")
    assert "aws-access-key-id" not in step["with"]  # no long-lived keys


def test_the_uploaded_artifact_is_the_bundle_output_dir() -> None:
    [bundle] = [c for c in kmskeys_commands() if c[0] == "bundle"]
    output_dir = bundle[bundle.index("--output-dir") + 1]
    upload = step_using("actions/upload-artifact")
    assert upload["with"]["path"].rstrip("/") == output_dir.rstrip("/")
    assert upload["with"]["if-no-files-found"] == "error"


def test_secrets_appear_only_in_env_never_in_commands_or_inputs() -> None:
    for step in steps():
        for key, value in step.items():
            if key != "env":
                assert "secrets." not in yaml.safe_dump(value), f"secret in {key} of {step}"
    env = bundle_step()["env"]
    assert any("secrets." in str(v) for v in env.values())


def test_every_kmskeys_command_matches_the_real_cli_help() -> None:
    commands = kmskeys_commands()
    assert {c[0] for c in commands} >= {"bundle", "inspect"}
    for command in commands:
        sub = command[0]
        helped = subprocess.run(
            [str(BIN / "kmskeys"), sub, "--help"], capture_output=True, text=True, check=False
        )
        assert helped.returncode == 0, f"kmskeys {sub} --help: {helped.stderr}"
        for option in (w.split("=")[0] for w in command[1:] if w.startswith("--")):
            assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", helped.stdout), (
                f"kmskeys {sub}: {option} is not in its --help"
            )


def test_the_bundle_step_runs_and_its_blobs_resolve(install: Install, tmp_path: Path) -> None:
    step = bundle_step()
    values = {
        "DB_PASSWORD": 'db pass with spaces and "quotes" and $dollars',
        "API_TOKEN": "tok-" + os.urandom(8).hex(),
        "SMTP_PASSWORD": "smtp-" + os.urandom(8).hex(),
    }
    env = {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        **TEST_CREDENTIALS,
        "AWS_ENDPOINT_URL": install.emulator.url,
        "KMSKEYS_KEY_ID": install.key_arn,
        **values,
    }
    done = subprocess.run(
        ["bash", "-e", "-c", step["run"]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for value in values.values():
        assert value not in done.stdout + done.stderr
    blobs = sorted(p.relative_to(tmp_path / "blobs") for p in (tmp_path / "blobs").rglob("*.kms"))
    assert [str(b) for b in blobs] == ["api/token.kms", "db-password.kms", "smtp-password.kms"]
    # `kmskeys inspect NAME FILE` described each blob and checked it against its file's name.
    for name in ("api/token", "db-password", "smtp-password"):
        assert f"check      ok: made for name {name}\n" in done.stdout
    for blob in blobs:
        install.deploy(str(blob.with_suffix("")), (tmp_path / "blobs" / blob).read_text())
    expected = {
        "db-password": values["DB_PASSWORD"],
        "api/token": values["API_TOKEN"],
        "smtp-password": values["SMTP_PASSWORD"],
    }
    for name, value in expected.items():
        assert get_secret(name, prefix=install.prefix) == value.encode()
