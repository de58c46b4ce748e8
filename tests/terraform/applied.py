"""Roots the tier applies to its moto server: examples/aws-sources, and the rotation root.

Each is applied from a copy of terraform/ of its own (the validate jobs init the session's main
copy meanwhile), with a provider override pointing every service at moto. `Applied` keeps what
a test reads back (outputs, `terraform show -json`) and destroys what it created.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import terraform as tfsupport
from tests.support.kms_emulator import TEST_CREDENTIALS
from tests.terraform.rendered import Rendered

# The region every applied root uses: the one the tests' boto3 clients and the resolver use.
REGION = TEST_CREDENTIALS["AWS_REGION"]


@dataclass
class Applied:
    """One applied root: its directory, outputs and state; `destroy()` undoes it."""

    tf: tfsupport.Terraform
    dir: Path
    outputs: dict[str, Any]
    state: Rendered
    applied: bool = True

    def destroy(self) -> None:
        """terraform destroy, once; the state is empty afterwards."""
        if not self.applied:
            return
        self.tf.run(self.dir, "destroy", "-auto-approve", "-input=false", "-no-color")
        self.applied = False
        left = self.tf.json(self.dir, "show", "-json").get("values")
        assert not left or not left.get("root_module", {}).get("resources"), left


def apply(
    tf: tfsupport.Terraform, directory: Path, moto_url: str, variables: dict[str, Any]
) -> Applied:
    """init + apply `directory` against moto with `variables`; destroyed again if apply fails."""
    (directory / "moto_override.tf").write_text(tfsupport.moto_provider(moto_url, REGION))
    (directory / "kmst.auto.tfvars.json").write_text(json.dumps(variables, indent=2))
    tf.init(directory)
    try:
        tf.run(directory, "apply", "-auto-approve", "-input=false", "-no-color")
    except tfsupport.TerraformError:
        # A failed apply may still have created something.
        tf.run(directory, "destroy", "-auto-approve", "-input=false", "-no-color", check=False)
        raise
    raw = tf.json(directory, "output", "-json")
    outputs = {name: out["value"] for name, out in raw.items()}
    return Applied(tf, directory, outputs, Rendered(tf.json(directory, "show", "-json")))


def example(
    tf: tfsupport.Terraform, root: Path, moto_url: str, name: str, variables: dict[str, Any]
) -> Applied:
    """examples/NAME from a copy of terraform/ of its own under `root`, applied with `variables`."""
    tree = tfsupport.copy_tree(root / f"tree-{name}")
    return apply(tf, tree / "examples" / name, moto_url, {"region": REGION, **variables})


def module_root(tree: Path, here: Path, module: str, label: str, inputs: dict[str, Any]) -> str:
    """main.tf of a root calling modules/<module> once as `label`, its outputs as output LABEL."""
    from tests.terraform.variants import hcl

    source = Path("..") / tree.relative_to(here.parent) / "modules" / module
    lines = [f'module "{label}" {{', f"  source = {hcl(str(source))}"]
    lines += [f"  {k} = {hcl(v)}" for k, v in inputs.items()]
    return "\n".join(
        [*lines, "}", "", f'output "{label}" {{', f"  value = module.{label}", "}", ""]
    )
