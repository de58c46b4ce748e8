"""The real terraform, offline: the provider mirror, a CLI config naming it, and moto endpoints.

Shared by the terraform test tier (tests/terraform) and `make demo-terraform`
(scripts/demo_terraform.py), so both set terraform up the same way:

- the hashicorp/aws provider comes from a filesystem mirror: `$KMSKEYS_TF_MIRROR`, or by
  default the first `registry.terraform.io/hashicorp/aws/.../terraform-provider-aws*` found
  under SEARCH_ROOTS, then anywhere under `/`;
- terraform reads a CLI config this module writes (TF_CLI_CONFIG_FILE), which installs from that
  mirror and never from the network;
- every run works on a temporary copy of terraform/, never on the repository's tree; a moto
  server is reached through a provider override file written into that copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tests.support.environ import snapshot

REPO = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = REPO / "terraform"

MIRROR_ENV = "KMSKEYS_TF_MIRROR"
# The default of MIRROR_ENV: these roots first (quick), then the whole filesystem.
SEARCH_ROOTS = ("/opt", "/usr/share", "/usr/local/share", "/root")
REGISTRY = "registry.terraform.io"
AWS_PROVIDER = f"{REGISTRY}/hashicorp/aws"

# The services the modules call, all answered by one moto server.
MOTO_SERVICES = ("ec2", "events", "iam", "kms", "s3", "secretsmanager", "ssm", "sts")

# Every terraform run: no prompts, no update check, the CLI config below, and no credentials
# or settings inherited from the caller's AWS or TF environment.
_QUIET_ENV = {"TF_IN_AUTOMATION": "1", "TF_INPUT": "0", "CHECKPOINT_DISABLE": "1"}
# terraform starts the AWS provider for every walk, and the provider spends most of its start-up
# building the schemas of ~1500 resources; a lazier Go garbage collector (the default is 100)
# cuts that CPU by about a fifth for ~40 MB more memory. A GOGC set by the caller wins.
_GO_GC = "400"


class TerraformError(Exception):
    """A terraform command failed; the message holds the command and the end of its output."""


def _mirror_root(provider_binary: Path) -> Path:
    """The mirror directory: the parent of the registry.terraform.io directory."""
    parts = provider_binary.parts
    return Path(*parts[: parts.index(REGISTRY)])


def _find(roots: tuple[str, ...]) -> Path | None:
    existing = [r for r in roots if os.path.isdir(r)]
    if not existing:
        return None
    found = subprocess.run(
        [
            "find",
            *existing,
            *("-path", f"*{AWS_PROVIDER}/*", "-name", "terraform-provider-aws*"),
            *("-print", "-quit"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = found.stdout.splitlines()
    return _mirror_root(Path(lines[0])) if lines else None


@cache
def find_mirror() -> Path | None:
    """The provider mirror: $KMSKEYS_TF_MIRROR if set, else the first one found on disk."""
    configured = os.environ.get(MIRROR_ENV)
    if configured:
        return Path(configured)
    return _find(SEARCH_ROOTS) or _find(("/",))


def has_aws_provider(mirror: Path) -> bool:
    """Whether `mirror` holds a terraform-provider-aws binary in the unpacked mirror layout."""
    return any((mirror / AWS_PROVIDER).glob("*/*/terraform-provider-aws*"))


@cache
def missing() -> str | None:
    """What this machine lacks to run the real terraform, in one line; None when nothing."""
    problems = []
    if shutil.which("terraform") is None:
        problems.append("terraform is not on PATH")
    mirror = find_mirror()
    if mirror is None:
        roots = ", ".join(SEARCH_ROOTS)
        problems.append(f"no {AWS_PROVIDER} provider mirror under {roots} or / (set {MIRROR_ENV})")
    elif not has_aws_provider(mirror):
        problems.append(f"{MIRROR_ENV}={mirror} holds no {AWS_PROVIDER} provider")
    return "; ".join(problems) or None


def cli_config(mirror: Path) -> str:
    """A CLI config that installs every registry.terraform.io provider from `mirror` only."""
    return (
        "provider_installation {\n"
        f"  filesystem_mirror {{\n    path = {json.dumps(str(mirror))}\n  }}\n"
        f'  direct {{\n    exclude = ["{REGISTRY}/*/*"]\n  }}\n'
        "}\n"
    )


def moto_provider(url: str, region: str) -> str:
    """A `provider "aws"` block for a moto server at `url`: test keys, no AWS account lookups.

    Written as an override file (NAME_override.tf), it merges into the example's own provider
    block, which keeps its region.
    """
    endpoints = "".join(f"    {s} = {json.dumps(url)}\n" for s in MOTO_SERVICES)
    return (
        'provider "aws" {\n'
        f"  region                      = {json.dumps(region)}\n"
        '  access_key                  = "testing"\n'
        '  secret_key                  = "testing"\n'
        "  skip_credentials_validation = true\n"
        "  skip_metadata_api_check     = true\n"
        "  skip_region_validation      = true\n"
        "  skip_requesting_account_id  = true\n"
        "  s3_use_path_style           = true\n"
        f"  endpoints {{\n{endpoints}  }}\n"
        "}\n"
    )


def copy_tree(dest: Path) -> Path:
    """Copy terraform/ to `dest` without any state, lock file, .terraform or override file."""
    ignore = shutil.ignore_patterns(
        ".terraform", ".terraform.lock.hcl", "*.tfstate*", "*override.tf"
    )
    shutil.copytree(TERRAFORM_DIR, dest, ignore=ignore)
    return dest


@dataclass(frozen=True)
class Terraform:
    """The terraform binary, offline: every run uses the CLI config written under `home`."""

    mirror: Path
    home: Path

    @classmethod
    def offline(cls, home: Path, mirror: Path | None = None) -> Terraform:
        """Write the CLI config into `home` (which must exist) and return the runner."""
        mirror = mirror or find_mirror()
        if mirror is None:
            raise TerraformError(missing() or "no provider mirror")
        (home / "cli.tfrc").write_text(cli_config(mirror))
        return cls(mirror, home)

    def env(self) -> dict[str, str]:
        """The environment of every terraform run."""
        inherited = {
            k: v for k, v in snapshot().items() if not k.startswith(("TF_", "AWS_", "CHECKPOINT"))
        }
        return {
            "GOGC": _GO_GC,
            **inherited,
            **_QUIET_ENV,
            "TF_CLI_CONFIG_FILE": str(self.home / "cli.tfrc"),
        }

    def run(
        self,
        cwd: Path,
        *args: str,
        check: bool = True,
        timeout: float = 600,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`terraform ARGS` in `cwd` (with `env` added to its environment); TerraformError with
        its output if it fails and `check`."""
        done = subprocess.run(
            ["terraform", *args],
            cwd=cwd,
            env={**self.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            output = (done.stderr.strip() or done.stdout.strip())[-3000:]
            raise TerraformError(
                f"terraform {' '.join(args)} in {cwd} exited {done.returncode}:\n{output}"
            )
        return done

    def json(self, cwd: Path, *args: str) -> Any:
        """The JSON that `terraform ARGS` prints (show -json, output -json, version -json)."""
        return json.loads(self.run(cwd, *args).stdout)

    def init(self, cwd: Path) -> None:
        """`terraform init` from the mirror; the provider is linked, not copied."""
        self.run(cwd, "init", "-input=false", "-no-color")

    def version(self) -> str:
        """The terraform version, e.g. 1.11.4."""
        return str(self.json(self.home, "version", "-json")["terraform_version"])


class CompleteExample:
    """examples/complete applied to a moto server, from a temporary copy of terraform/."""

    def __init__(
        self, tf: Terraform, workdir: Path, moto_url: str, region: str, variables: dict[str, Any]
    ) -> None:
        self.tf = tf
        self.dir = copy_tree(workdir) / "examples" / "complete"
        (self.dir / "moto_override.tf").write_text(moto_provider(moto_url, region))
        # The example's region must match the override's: it is the region moto files keys under.
        inputs = {"region": region, **variables}
        (self.dir / "kmst.auto.tfvars.json").write_text(json.dumps(inputs, indent=2))
        self.applied = False

    def apply(self) -> dict[str, Any]:
        """init + apply; the outputs as {name: value}."""
        self.tf.init(self.dir)
        self.applied = True  # a failed apply may still have created something: destroy it
        self.tf.run(self.dir, "apply", "-auto-approve", "-input=false", "-no-color")
        return self.outputs()

    def outputs(self) -> dict[str, Any]:
        """The root module's outputs, {name: value}."""
        raw = self.tf.json(self.dir, "output", "-json")
        return {name: out["value"] for name, out in raw.items()}

    def state(self) -> dict[str, Any]:
        """`terraform show -json` of the state."""
        shown = self.tf.json(self.dir, "show", "-json")
        assert isinstance(shown, dict)
        return shown

    def destroy(self) -> None:
        """Destroy what apply created; nothing is left in terraform's state afterwards."""
        if not self.applied:
            return
        self.tf.run(self.dir, "destroy", "-auto-approve", "-input=false", "-no-color")
        self.applied = False
