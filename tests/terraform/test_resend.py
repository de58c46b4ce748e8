"""The tier's applies survive a create the provider resent, and only that.

The AWS provider's SDK resends a request whose answer was a 5xx or a lost connection; for a
create that moto had already done, the resend meets the resource (CI once failed the rotation
root so: `DocumentAlreadyExists` for the runbook its own first CreateDocument had made).
tests/terraform/applied.py applies such a root again on a fresh moto. Here one SSM document is
applied through tests/terraform/resend.py, which loses moto's first answer to CreateDocument;
and a document that already exists under the name (a real collision) still fails the apply.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import terraform as tfsupport
from tests.support.kms_emulator import KmsEmulator
from tests.support.names import unique
from tests.terraform import applied
from tests.terraform.conftest import Workspace
from tests.terraform.resend import LostAnswer

pytestmark = pytest.mark.terraform

CONTENT = {
    "schemaVersion": "2.2",
    "description": "kmskeys test: a document the provider creates once",
    "mainSteps": [
        {"action": "aws:runShellScript", "name": "noop", "inputs": {"runCommand": ["true"]}}
    ],
}


def document_root(here: Path, name: str) -> Path:
    """A root with one Command document named NAME."""
    here.mkdir()
    (here / "main.tf").write_text(
        'resource "aws_ssm_document" "this" {\n'
        f"  name          = {json.dumps(name)}\n"
        '  document_type = "Command"\n'
        f"  content       = {json.dumps(json.dumps(CONTENT))}\n"
        "}\n"
    )
    return here


class Servers:
    """The moto servers an apply asked for, in order; `lossy` makes the first one a LostAnswer."""

    def __init__(self, tmp_path: Path, lossy: bool) -> None:
        self.tmp_path = tmp_path
        self.lossy = lossy
        self.started: list[KmsEmulator] = []

    def start(self) -> KmsEmulator:
        log = self.tmp_path / f"moto-{len(self.started)}.log"
        first = not self.started
        moto = LostAnswer("CreateDocument", log) if self.lossy and first else KmsEmulator(log=log)
        self.started.append(moto)
        return moto.start()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[[bool], Servers]]:
    made: list[Servers] = []

    def make(lossy: bool) -> Servers:
        made.append(Servers(tmp_path, lossy))
        return made[-1]

    yield make
    for group in made:
        for moto in group.started:
            moto.stop()


def test_a_create_whose_answer_was_lost_is_applied_again_on_a_fresh_moto(
    workspace: Workspace, tmp_path: Path, servers: Callable[[bool], Servers]
) -> None:
    name = unique("resend")
    here = document_root(tmp_path / "root", name)
    motos, notes = servers(True), list[str]()
    run = applied.apply(workspace.tf, here, motos.start, {}, notes)
    lossy, fresh = motos.started
    assert isinstance(lossy, LostAnswer) and lossy.lost.is_set()
    assert not lossy.running  # the moto holding the orphan is gone
    # The provider resent CreateDocument, and the first apply failed on what it had made.
    log = (here / applied.PROVIDER_LOG).read_text()
    assert "retrying request SSM/CreateDocument, attempt 2" in log
    (note,) = notes
    assert "SSM/CreateDocument" in note and "a connection broke" in note
    assert run.moto is fresh
    described = fresh.client("ssm").describe_document(Name=name)["Document"]
    assert described["Status"] == "Active"
    assert run.state.values("aws_ssm_document.this")["name"] == name
    # No destroy: the document lives in that moto's memory only, and the server stops.


def test_a_create_that_meets_a_resource_of_another_is_not_applied_again(
    workspace: Workspace, tmp_path: Path, servers: Callable[[bool], Servers]
) -> None:
    name = unique("taken")
    here = document_root(tmp_path / "root", name)
    motos, notes = servers(False), list[str]()
    # Someone else's document under the same name: no resend made it, no retry may hide it.
    taken = motos.start()
    taken.client("ssm").create_document(
        Name=name, Content=json.dumps(CONTENT), DocumentType="Command"
    )
    with pytest.raises(tfsupport.TerraformError, match="DocumentAlreadyExists"):
        applied.apply(workspace.tf, here, lambda: taken, {}, notes)
    assert notes == []
    assert "retrying request" not in (here / applied.PROVIDER_LOG).read_text()
