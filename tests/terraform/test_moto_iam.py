"""The policy JSON terraform rendered, on real IAM principals in a moto server enforcing IAM.

What moto 5.2 evaluates (read from moto/iam/access_control.py and checked here): the Action of
identity policies and explicit Deny statements, for users and for assumed roles, plus a role's
trust policy on sts:AssumeRole. What it does not: KMS calls are authorised against the resource
"*", so a statement scoped to the key's ARN never matches (the tests widen Resource to "*"
and test_policies.py asserts the real scoping); a statement with NotResource and no Resource
is taken for a trust-policy statement and *permits* (so the seal variant's NotResource deny
cannot be run here: asserted statically); conditions are only evaluated for StringEquals on
sts:ExternalId (kms:EncryptionContext* and ec2:SourceInstanceARN conditions are asserted
statically; policy variables are never resolved); key policies are only consulted for
DescribeKey denies. KMS itself does enforce the encryption context: a blob only decrypts under
the context it was encrypted with.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator
from tests.support.names import unique
from tests.terraform.conftest import policy_of
from tests.terraform.rendered import Rendered
from tests.terraform.variants import KEY_ARN, MOTO_BUILDER

pytestmark = pytest.mark.terraform

REGION = TEST_CREDENTIALS["AWS_REGION"]

ASSUME_ONLY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}],
}


def enforced(policy: dict[str, Any]) -> str:
    """The policy with every Resource widened to "*": moto authorises KMS calls against "*".

    Each Resource must have been the planned key or "*" (nothing else gets widened).
    """
    widened = []
    for statement in policy["Statement"]:
        resources = statement["Resource"]
        assert resources in (KEY_ARN, "*", [KEY_ARN]), statement
        widened.append({**statement, "Resource": ["*"]})
    return json.dumps({**policy, "Statement": widened})


def denied(call: Callable[[], Any]) -> bool:
    """Whether IAM refused the call (moto answers 403 AccessDenied)."""
    try:
        call()
    except ClientError as exc:
        status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
        return status == 403 and "AccessDenied" in str(exc)
    return False


class Principals:
    """Users, roles and a key made while IAM is open, then used with enforcement on."""

    def __init__(self, emulator: KmsEmulator):
        self.url = emulator.url
        self.admin = self._session(TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"], "testing")
        self.iam = self.admin.client("iam", endpoint_url=self.url)
        kms = self.admin.client("kms", endpoint_url=self.url)
        self.key = kms.create_key(Description=unique("terraform"))["KeyMetadata"]
        self.blob = kms.encrypt(
            KeyId=self.key["Arn"],
            Plaintext=b"kmst-not-a-secret",
            EncryptionContext={"kmskeys_name": "web/db"},
        )["CiphertextBlob"]

    def _session(self, key_id: str, secret: str, token: str | None = None) -> boto3.Session:
        return boto3.Session(
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            aws_session_token=token,
            region_name=REGION,
        )

    def user(self, name: str, policy: str) -> boto3.Session:
        self.iam.create_user(UserName=name)
        self.iam.put_user_policy(UserName=name, PolicyName="kmskeys", PolicyDocument=policy)
        key = self.iam.create_access_key(UserName=name)["AccessKey"]
        return self._session(key["AccessKeyId"], key["SecretAccessKey"])

    def role(self, name: str, trust: str, policy: str) -> str:
        arn = self.iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust)["Role"]["Arn"]
        self.iam.put_role_policy(RoleName=name, PolicyName="kmskeys", PolicyDocument=policy)
        return str(arn)

    def assume(self, session: boto3.Session, role_arn: str) -> boto3.Session:
        sts = session.client("sts", endpoint_url=self.url)
        creds = sts.assume_role(RoleArn=role_arn, RoleSessionName="kmst")["Credentials"]
        return self._session(creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"])

    def enforce(self) -> None:
        """Switch moto's IAM enforcement on from the next request (the server's reset-auth)."""
        request = urllib.request.Request(
            f"{self.url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.load(answer)["status"] == "ok"

    def kms(self, session: boto3.Session) -> Any:
        return session.client("kms", endpoint_url=self.url)


@pytest.fixture
def principals() -> Iterator[Principals]:
    with KmsEmulator() as emulator:
        yield Principals(emulator)


@pytest.fixture
def sessions(principals: Principals, good_plan: Rendered) -> dict[str, Any]:
    """CI and host principals carrying the modules' rendered policies, enforcement on."""
    ci_user = principals.user(unique("ci"), enforced(policy_of(good_plan, "enc_default", "kms")))
    host_user = principals.user(
        unique("host"), enforced(policy_of(good_plan, "host_default", "kms"))
    )

    # The CI role proper: its trust policy is the module's plain-principal variant, naming a
    # builder user that may do nothing but assume it.
    builder = principals.user(MOTO_BUILDER, json.dumps(ASSUME_ONLY))
    stranger = principals.user(unique("stranger"), json.dumps(ASSUME_ONLY))
    role_arn = principals.role(
        unique("ci-role"),
        json.dumps(policy_of(good_plan, "enc_builder_user", "trust")),
        enforced(policy_of(good_plan, "enc_builder_user", "kms")),
    )
    principals.enforce()
    return {
        "ci": principals.kms(ci_user),
        "host": principals.kms(host_user),
        "ci_role": principals.kms(principals.assume(builder, role_arn)),
        "builder": principals.kms(builder),
        "stranger": stranger,
        "role_arn": role_arn,
    }


NAME = {"kmskeys_name": "web/db"}


def test_enforcement_is_really_on(principals: Principals, sessions: dict[str, Any]) -> None:
    # The builder may only assume the role: every KMS call of its own is refused.
    assert denied(lambda: sessions["builder"].describe_key(KeyId=principals.key["Arn"]))


@pytest.mark.parametrize("who", ["ci", "ci_role"])
def test_the_encryptor_encrypts_and_is_denied_decrypt(
    principals: Principals, sessions: dict[str, Any], who: str
) -> None:
    kms = sessions[who]
    key = principals.key["Arn"]
    blob = kms.encrypt(KeyId=key, Plaintext=b"kmst-x", EncryptionContext=NAME)["CiphertextBlob"]
    kms.generate_data_key(KeyId=key, KeySpec="AES_256", EncryptionContext=NAME)
    assert kms.describe_key(KeyId=key)["KeyMetadata"]["Arn"] == key
    assert denied(lambda: kms.decrypt(CiphertextBlob=blob, EncryptionContext=NAME))
    assert denied(lambda: kms.decrypt(CiphertextBlob=principals.blob, EncryptionContext=NAME))
    assert denied(
        lambda: kms.re_encrypt(
            CiphertextBlob=principals.blob, SourceEncryptionContext=NAME, DestinationKeyId=key
        )
    )


def test_the_host_decrypts_and_is_denied_encrypt(
    principals: Principals, sessions: dict[str, Any]
) -> None:
    kms = sessions["host"]
    key = principals.key["Arn"]
    answer = kms.decrypt(CiphertextBlob=principals.blob, EncryptionContext=NAME)
    assert answer["Plaintext"] == b"kmst-not-a-secret"
    assert answer["KeyId"] == key
    assert denied(lambda: kms.encrypt(KeyId=key, Plaintext=b"kmst-x", EncryptionContext=NAME))
    assert denied(
        lambda: kms.generate_data_key(KeyId=key, KeySpec="AES_256", EncryptionContext=NAME)
    )
    assert denied(
        lambda: kms.generate_data_key_without_plaintext(
            KeyId=key, KeySpec="AES_256", EncryptionContext=NAME
        )
    )
    assert denied(
        lambda: kms.re_encrypt(
            CiphertextBlob=principals.blob, SourceEncryptionContext=NAME, DestinationKeyId=key
        )
    )
    assert denied(lambda: kms.describe_key(KeyId=key))


def test_a_blob_only_decrypts_under_its_own_name(
    principals: Principals, sessions: dict[str, Any]
) -> None:
    # IAM conditions are not evaluated by moto; the cryptographic binding is.
    kms = sessions["host"]
    for context in ({"kmskeys_name": "web/other"}, {}):
        with pytest.raises(ClientError) as refused:
            kms.decrypt(CiphertextBlob=principals.blob, EncryptionContext=context)
        assert refused.value.response["Error"]["Code"] == "InvalidCiphertextException"


def test_only_the_trusted_principal_may_assume_the_ci_role(
    principals: Principals, sessions: dict[str, Any]
) -> None:
    assert denied(lambda: principals.assume(sessions["stranger"], sessions["role_arn"]))
