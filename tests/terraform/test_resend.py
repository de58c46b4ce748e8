"""The tier's applies survive a create the provider resent, and only that.

The AWS provider's SDK resends a request whose answer was a 5xx or a lost connection; for a
create that moto had already done, the resend meets the resource (CI once failed the rotation
root so: `DocumentAlreadyExists` for the runbook its own first CreateDocument had made).
tests/terraform/applied.py applies such a root again on a fresh moto. Here one SSM document is
applied through tests/terraform/resend.py, which loses moto's first answer to CreateDocument;
and a document that already exists under the name (a real collision) still fails the apply.
"""

from __future__ import annotations

import pytest

from tests.support import terraform as tfsupport
from tests.terraform.resend import LostAnswer, ResendRun

pytestmark = pytest.mark.terraform


def test_a_create_whose_answer_was_lost_is_applied_again_on_a_fresh_moto(
    resend_lost: ResendRun,
) -> None:
    assert resend_lost.error is None, resend_lost.error
    lossy, fresh = resend_lost.started
    assert isinstance(lossy, LostAnswer) and lossy.lost.is_set()
    assert not lossy.running  # the moto holding the orphan is gone
    # The provider resent CreateDocument, and the first apply failed on what it had made.
    assert "retrying request SSM/CreateDocument, attempt 2" in resend_lost.provider_log()
    (note,) = resend_lost.notes
    assert "SSM/CreateDocument" in note and "a connection broke" in note
    assert resend_lost.run is not None and resend_lost.run.moto is fresh
    described = fresh.client("ssm").describe_document(Name=resend_lost.name)["Document"]
    assert described["Status"] == "Active"
    assert resend_lost.run.state.values("aws_ssm_document.this")["name"] == resend_lost.name
    # No destroy: the document lives in that moto's memory only, and the server stops.


def test_a_create_that_meets_a_resource_of_another_is_not_applied_again(
    resend_taken: ResendRun,
) -> None:
    # Someone else's document under the same name: no resend made it, no retry may hide it.
    assert isinstance(resend_taken.error, tfsupport.TerraformError), resend_taken.error
    assert "DocumentAlreadyExists" in str(resend_taken.error)
    assert resend_taken.run is None and resend_taken.notes == []
    assert "retrying request" not in resend_taken.provider_log()
