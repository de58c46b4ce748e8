"""Roots the tier applies to moto: examples/aws-sources, and the rotation root.

Each is applied from a copy of terraform/ of its own (the validate jobs init the session's main
copy meanwhile), to a moto server of its own, through a provider override pointing every
service at it. `Applied` keeps what a test reads back (that moto, the outputs, `terraform show
-json`) and destroys what it created.

Why a moto server per root, and one retry. The provider's SDK resends a request whose answer
was a 5xx or a broken connection (standard retry mode, 25 attempts). A create that moto had
already done then meets its own resource: CI once failed the rotation root on
`DocumentAlreadyExists` for the runbook its first CreateDocument had created (the names are
unique to the root). The orphan is in no state, so no apply against that moto can succeed
again: the apply is retried once, on a fresh moto, and only when the provider's own log shows
it resent the very create that collided. Each retry is reported at the end of the session, with
moto's 5xx answers if it logged any.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import terraform as tfsupport
from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator
from tests.terraform.rendered import Rendered

# The region every applied root uses: the one the tests' boto3 clients and the resolver use.
REGION = TEST_CREDENTIALS["AWS_REGION"]

# The provider's debug log of an apply, where the SDK logs each request it resends.
PROVIDER_LOG = "provider.log"
RESENT = re.compile(r"retrying request ([^/\n]+)/(\w+), attempt \d+")
# A create refused because the resource exists: "operation error SSM: CreateDocument, https
# response error ..., DocumentAlreadyExists: ..." (IAM says EntityAlreadyExists, Secrets
# Manager ResourceExistsException).
COLLIDED = re.compile(
    r"operation error ([^:\n]+): (\w+), [^\n]*?\b(?:\w*AlreadyExists\w*|ResourceExistsException)\b"
)
# moto's answers that make the SDK resend: a 5xx in werkzeug's access log, or a traceback.
SERVER_ERROR = re.compile(r'" 5\d\d |Error on request')

# One line per apply retried this session (conftest prints them at the end).
RETRIED: list[str] = []


@dataclass
class Applied:
    """One applied root: its directory, moto server, outputs and state; `destroy()` undoes it."""

    tf: tfsupport.Terraform
    dir: Path
    moto: KmsEmulator
    outputs: dict[str, Any]
    state: Rendered
    applied: bool = True

    def destroy(self) -> None:
        """terraform destroy, once; the state is empty afterwards."""
        if not self.applied:
            return
        self.tf.run(self.dir, *DESTROY)
        self.applied = False
        left = self.tf.json(self.dir, "show", "-json").get("values")
        assert not left or not left.get("root_module", {}).get("resources"), left


def apply(
    tf: tfsupport.Terraform,
    directory: Path,
    start_moto: Callable[[], KmsEmulator],
    variables: dict[str, Any],
    notes: list[str] = RETRIED,
) -> Applied:
    """init + apply `directory` with `variables` to a moto server `start_moto` starts.

    A failed apply is destroyed again (it may have created something). It is retried once, on a
    fresh moto, when every create that collided had been resent by the provider; the retry is
    noted in `notes`.
    """
    (directory / "kmst.auto.tfvars.json").write_text(json.dumps(variables, indent=2))
    for attempt in (1, 2):
        moto = start_moto()
        (directory / "moto_override.tf").write_text(tfsupport.moto_provider(moto.url, REGION))
        if attempt == 1:
            tf.init(directory)
        done = tf.run(directory, *APPLY, check=False, env=provider_log(directory))
        if done.returncode == 0:
            break
        tf.run(directory, *DESTROY, check=False)
        resent = resent_creates(done.stderr, directory / PROVIDER_LOG)
        if attempt == 2 or not resent:
            output = (done.stderr.strip() or done.stdout.strip())[-3000:]
            raise tfsupport.TerraformError(
                f"terraform {' '.join(APPLY)} in {directory} exited {done.returncode}:\n{output}"
            )
        notes.append(retry_note(directory, resent, moto))
        moto.stop()
    raw = tf.json(directory, "output", "-json")
    outputs = {name: out["value"] for name, out in raw.items()}
    return Applied(tf, directory, moto, outputs, Rendered(tf.json(directory, "show", "-json")))


APPLY = ("apply", "-auto-approve", "-input=false", "-no-color")
DESTROY = ("destroy", "-auto-approve", "-input=false", "-no-color")


def provider_log(directory: Path) -> dict[str, str]:
    """terraform's environment for a debug log of the provider alone (~0.5 MB per apply)."""
    return {"TF_LOG_PROVIDER": "DEBUG", "TF_LOG_PATH": str(directory / PROVIDER_LOG)}


def resent_creates(error: str, log: Path) -> list[str]:
    """The creates that met a resource of their own making: each refused as existing, each
    resent by the provider (its log). Empty if any collision was not a resend."""
    collided = {(service, operation) for service, operation in COLLIDED.findall(error)}
    text = log.read_text(errors="replace") if log.exists() else ""
    resent = {(service, operation) for service, operation in RESENT.findall(text)}
    if not collided or not collided <= resent:
        return []
    return sorted(f"{service}/{operation}" for service, operation in collided)


def retry_note(directory: Path, resent: list[str], moto: KmsEmulator) -> str:
    """One line: which root was retried, which creates the provider resent, and why."""
    log = moto.log.read_text(errors="replace") if moto.log and moto.log.exists() else ""
    errors = [line.strip() for line in log.splitlines() if SERVER_ERROR.search(line)]
    why = "; ".join(errors[:3]) or "no 5xx in its log: a connection broke after moto acted"
    return (
        f"{directory.name}: applied again on a fresh moto: the provider resent "
        f"{', '.join(resent)} and met what its first attempt had created (moto: {why})"
    )


def example(
    tf: tfsupport.Terraform,
    root: Path,
    start_moto: Callable[[], KmsEmulator],
    name: str,
    variables: dict[str, Any],
) -> Applied:
    """examples/NAME from a copy of terraform/ of its own under `root`, applied with `variables`."""
    tree = tfsupport.copy_tree(root / f"tree-{name}")
    return apply(tf, tree / "examples" / name, start_moto, {"region": REGION, **variables})


def module_root(tree: Path, here: Path, module: str, label: str, inputs: dict[str, Any]) -> str:
    """main.tf of a root calling modules/<module> once as `label`, its outputs as output LABEL."""
    from tests.terraform.variants import hcl

    source = Path("..") / tree.relative_to(here.parent) / "modules" / module
    lines = [f'module "{label}" {{', f"  source = {hcl(str(source))}"]
    lines += [f"  {k} = {hcl(v)}" for k, v in inputs.items()]
    return "\n".join(
        [*lines, "}", "", f'output "{label}" {{', f"  value = module.{label}", "}", ""]
    )
