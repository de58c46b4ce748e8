"""`make demo-terraform`: the Terraform modules applied, then used, against a local moto server.

`terraform apply` of terraform/examples/complete (the real terraform and AWS provider, offline,
from a temporary copy of the tree; tests/support/terraform.py); the CI role it created encrypts
a secret with `kmskeys encrypt`; the host role it created decrypts it through a real resolver
install and the kernel's upcall; the host role wraps a key under the seal key, bound to its
instance; then `terraform destroy`. Only fingerprints of secrets are printed.

moto does not enforce IAM: the roles' policies are applied but not evaluated here (AWS does).
The encryption context binding is real: moto's KMS only decrypts under the context of the
encryption. Exit status 0 means every step really worked.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from botocore.exceptions import ClientError  # noqa: E402

from kmskeys import Keyring  # noqa: E402
from scripts.demo import (  # noqa: E402
    INDENT,
    DemoError,
    Step,
    Steps,
    _terminate,
    fingerprint,
    root_file,
    run_demo,
    undo_all,
)
from tests.support import terraform as tfsupport  # noqa: E402
from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator  # noqa: E402
from tests.upcall.harness import KMSKEYS, Install, installed  # noqa: E402

NAME = "web/db-password"
REGION = TEST_CREDENTIALS["AWS_REGION"]
STEPS = 8
NOT_ENFORCED = (
    "moto does not enforce IAM: the roles' policies are applied but never evaluated here "
    "(AWS evaluates them); moto's KMS does bind each ciphertext to its encryption context"
)
EXAMPLE_INPUTS: dict[str, Any] = {
    "github_repository": "example-org/app",
    "image_id": "ami-0123456789abcdef0",
    "kmskeys_wheel": "s3://kmsdemo-artifacts/kmskeys/kmskeys-0.1.0-cp311-abi3-manylinux_2_34_x86_64.whl",
    "enable_seal": True,
}


class TerraformDemo:
    """The demo's state, so that cleanup removes exactly what the steps created."""

    def __init__(self, state_json: Path | None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="kmsdemo-tf-"))
        self.state_json = state_json
        # terraform steps take tens of seconds: a progress line every 10 s is enough.
        self.steps = Steps(STEPS, tick=10.0)
        self.stack = ExitStack()
        self.emulator: KmsEmulator | None = None
        self.example: tfsupport.CompleteExample | None = None
        self.install: Install | None = None
        self.outputs: dict[str, Any] = {}
        self.blob = ""
        self.host_creds: dict[str, Any] = {}
        self.instances: list[str] = []

    # -- steps ----------------------------------------------------------------------------------

    def apply(self, step: Step) -> None:
        step.doing = "starting the moto server"
        self.emulator = KmsEmulator(log=self.tmp / "moto.log").start()
        tf = tfsupport.Terraform.offline(self.tmp)
        name = f"kmsdemo-{secrets.token_hex(3)}"
        self.example = tfsupport.CompleteExample(
            tf, self.tmp / "terraform", self.emulator.url, REGION, {**EXAMPLE_INPUTS, "name": name}
        )
        step.doing = "terraform init + apply (the AWS provider waits for IAM and KMS to settle)"
        self.outputs = self.example.apply()
        state = self.example.state()
        if self.state_json is not None:
            self.state_json.write_text(json.dumps(state))
        count = len(managed_resources(state))
        for key in ("key_arn", "ci_role_arn", "host_role_arn", "seal_key_arn"):
            print(f"{INDENT}{key} = {self.outputs[key]}")
        step.result = f"{count} resources in moto {self.emulator.url}, terraform {tf.version()}"

    def encrypt(self, step: Step, secret: bytes) -> None:
        step.doing = "STS AssumeRoleWithWebIdentity, as the GitHub Actions job would"
        sts = self.client("sts")
        answer = sts.assume_role_with_web_identity(
            RoleArn=self.outputs["ci_role_arn"],
            RoleSessionName="kmskeys-demo-ci",
            # moto checks neither the token nor the role's OIDC trust conditions.
            WebIdentityToken="not-a-real-github-token",
        )
        creds = answer["Credentials"]
        env = {
            **clean_env(),
            "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
            "AWS_SESSION_TOKEN": creds["SessionToken"],
        }
        step.doing = "kmskeys encrypt (the secret on stdin)"
        blob = self.tmp / "db-password.kms"
        argv = [str(KMSKEYS), "encrypt", NAME, "--key-id", self.outputs["key_arn"]]
        argv += ["--region", REGION, "--endpoint-url", self.url, "--output", str(blob)]
        run(argv, env, stdin=secret)
        self.blob = blob.read_text().strip()
        if not self.blob or secret.decode() in self.blob:
            raise DemoError(f"{blob} does not look like a blob")
        step.result = (
            f"as {answer['AssumedRoleUser']['Arn']}: secret sha256 {fingerprint(secret)} "
            f"-> blob of {len(self.blob)} chars"
        )

    def install_resolver(self, step: Step) -> None:
        assert self.emulator is not None
        step.doing = "STS AssumeRole of the host role, as the instance profile would"
        creds = self.client("sts").assume_role(
            RoleArn=self.outputs["host_role_arn"], RoleSessionName="kmskeys-demo-host"
        )["Credentials"]
        self.host_creds = creds
        credentials = self.tmp / "host-credentials"
        root_file(
            credentials,
            "[default]\n"
            f"aws_access_key_id = {creds['AccessKeyId']}\n"
            f"aws_secret_access_key = {creds['SecretAccessKey']}\n"
            f"aws_session_token = {creds['SessionToken']}\n",
            0o600,
        )
        step.doing = "kmskeys-resolver install under a unique prefix"
        self.install = self.stack.enter_context(
            installed(
                self.emulator,
                None,
                self.outputs["key_arn"],
                shared_credentials_file=credentials,
            )
        )
        self.install.deploy(NAME, self.blob)
        step.result = (
            f"prefix {self.install.prefix}; credentials {credentials.name} "
            f"(root, {oct(credentials.stat().st_mode & 0o777)}); blob {NAME}.kms deployed"
        )

    def get(self, step: Step, secret: bytes) -> None:
        assert self.install is not None
        step.doing = "kmskeys get: request_key -> /sbin/request-key -> kmskeys-resolver"
        argv = [str(KMSKEYS), "get", NAME, "--prefix", self.install.prefix]
        got = subprocess.run(argv, capture_output=True, env=clean_env(), timeout=60, check=False)
        if got.returncode != 0:
            raise DemoError(f"kmskeys get exited {got.returncode}: {got.stderr.decode().strip()}")
        print(f"{INDENT}resolver log: {self.install.log.wait_for(NAME).split(']: ', 1)[-1]}")
        if got.stdout != secret:
            raise DemoError(
                f"kmskeys get returned sha256 {fingerprint(got.stdout)}, "
                f"expected {fingerprint(secret)}"
            )
        step.result = f"sha256 {fingerprint(got.stdout)} (matches what CI encrypted)"

    def seal(self, step: Step) -> None:
        assert self.install is not None
        step.doing = "two instances from the launch template"
        ec2 = self.client("ec2")
        started = ec2.run_instances(
            LaunchTemplate={"LaunchTemplateId": self.outputs["host_launch_template_id"]},
            MinCount=2,
            MaxCount=2,
        )["Instances"]
        self.instances = [i["InstanceId"] for i in started]
        account = self.outputs["key_arn"].split(":")[4]
        here, other = (f"arn:aws:ec2:{REGION}:{account}:instance/{i}" for i in self.instances)
        kms = self.host_kms()
        context = {
            "kmskeys_seal": "stored",
            "kmskeys_host": here,
            "kmskeys_scope": "machine",
            "kmskeys_name": "demo",
        }
        step.doing = "GenerateDataKey under the seal key, bound to the first instance"
        key = kms.generate_data_key(
            KeyId=self.outputs["seal_key_arn"], KeySpec="AES_256", EncryptionContext=context
        )
        back = kms.decrypt(CiphertextBlob=key["CiphertextBlob"], EncryptionContext=context)
        if back["Plaintext"] != key["Plaintext"] or back["KeyId"] != self.outputs["seal_key_arn"]:
            raise DemoError("the wrapped key did not unwrap under its own context")
        try:
            kms.decrypt(
                CiphertextBlob=key["CiphertextBlob"],
                EncryptionContext={**context, "kmskeys_host": other},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "InvalidCiphertextException":
                raise
        else:
            raise DemoError("the wrapped key opened under another instance's ARN")
        step.result = (
            f"unwraps on {self.instances[0]}; under {self.instances[1]}'s ARN: "
            "InvalidCiphertextException (AWS also checks kmskeys_host = ec2:SourceInstanceARN)"
        )

    def uninstall(self, step: Step) -> None:
        assert self.install is not None
        rule = Path("/etc/request-key.d") / f"kmskeys-{self.install.prefix}.conf"
        self.stack.close()  # kmskeys-resolver uninstall, log socket, temp files
        if rule.exists():
            raise DemoError(f"{rule} is still there")
        step.result = f"{rule} removed"

    def destroy(self, step: Step) -> None:
        assert self.example is not None
        step.doing = "terminating the demo's instances"
        if self.instances:
            self.client("ec2").terminate_instances(InstanceIds=self.instances)
            self.instances = []
        step.doing = "terraform destroy"
        self.example.destroy()
        self.check_destroyed()
        step.result = (
            "roles, instance profile, launch template and aliases gone; keys pending deletion"
        )

    def check_destroyed(self) -> None:
        iam = self.client("iam")
        for arn in (self.outputs["ci_role_arn"], self.outputs["host_role_arn"]):
            try:
                iam.get_role(RoleName=arn.rsplit("/", 1)[-1])
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "NoSuchEntity":
                    raise
            else:
                raise DemoError(f"{arn} still exists after terraform destroy")
        kms = self.client("kms")
        for key in (self.outputs["key_arn"], self.outputs["seal_key_arn"]):
            state = kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"]
            if state != "PendingDeletion":
                raise DemoError(f"{key} is {state} after terraform destroy")
        aliases = {a["AliasName"] for a in kms.list_aliases()["Aliases"]}
        if self.outputs["key_alias"] in aliases:
            raise DemoError(f"{self.outputs['key_alias']} still exists after terraform destroy")

    # -- helpers --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.emulator is not None
        return self.emulator.url

    def client(self, service: str) -> Any:
        """A boto3 client on moto with the test account's credentials (the operator)."""
        assert self.emulator is not None
        return self.emulator.client(service)

    def host_kms(self) -> Any:
        """A KMS client with the host role's session credentials (what the resolver uses)."""
        import boto3

        return boto3.client(
            "kms",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=self.host_creds["AccessKeyId"],
            aws_secret_access_key=self.host_creds["SecretAccessKey"],
            aws_session_token=self.host_creds["SessionToken"],
        )

    def cleanup(self) -> list[str]:
        """Undo every step that ran; the problems met on the way (empty when all went well)."""
        actions: list[tuple[str, Callable[[], object]]] = [
            ("uninstall the resolver", self.stack.close)
        ]
        if self.example is not None and self.example.applied:
            actions.append(("terraform destroy", self.example.destroy))
        if self.emulator is not None:
            actions.append(("stop the moto server", self.emulator.stop))
        actions.append(("empty the demo's session keyring", lambda: Keyring.session().clear()))
        actions.append(("remove temp files", lambda: shutil.rmtree(self.tmp)))
        return undo_all(actions)


def managed_resources(state: dict[str, Any]) -> list[str]:
    """Addresses of the managed resources in `terraform show -json` of a state."""
    found: list[str] = []

    def walk(module: dict[str, Any]) -> None:
        found.extend(r["address"] for r in module.get("resources", []) if r["mode"] == "managed")
        for child in module.get("child_modules", []):
            walk(child)

    walk(state["values"]["root_module"])
    return found


def clean_env() -> dict[str, str]:
    """This environment without any AWS setting: each command gets exactly the credentials given."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def run(argv: list[str], env: dict[str, str], stdin: bytes | None = None) -> str:
    """Run a command; its stdout, or DemoError with its stderr."""
    done = subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=120, check=False)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise DemoError(f"`{' '.join(argv[:2])} ...` exited {done.returncode}: {err}")
    return done.stdout.decode(errors="replace")


def preflight() -> list[str]:
    """What this machine lacks for the demo."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the resolver install writes /etc/request-key.d)")
    if not Path("/sbin/request-key").exists():
        missing.append("/sbin/request-key (apt-get install keyutils)")
    if not KMSKEYS.exists():
        missing.append(f"{KMSKEYS} (pip install -e '.[dev]')")
    terraform = tfsupport.missing()
    if terraform:
        missing.append(terraform)
    return missing


def main(argv: list[str] | None = None) -> int:
    """Run the eight steps; clean up whatever happened; 0 only if everything worked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--state-json",
        type=Path,
        help="also write `terraform show -json` of the applied state to this file",
    )
    args = parser.parse_args(argv)
    missing = preflight()
    if missing:
        print(
            "make demo-terraform cannot run here; missing: " + "; ".join(missing), file=sys.stderr
        )
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    print("kmskeys Terraform demo: examples/complete applied to a local moto server, then used")
    print(f"note: {NOT_ENFORCED}")
    # The `kmskeys get` below inherits this session keyring, where the resolver caches the key.
    Keyring.join_session()
    started = time.monotonic()
    demo = TerraformDemo(args.state_json)
    steps = demo.steps
    secret = secrets.token_urlsafe(24).encode()

    def body() -> None:
        with steps.step("terraform apply examples/complete (seal key on) against moto") as s:
            demo.apply(s)
        with steps.step(f"CI: assume the encrypt role, kmskeys encrypt {NAME} (stdin)") as s:
            demo.encrypt(s, secret)
        with steps.step("host: assume the decrypt role, root-only credentials, install") as s:
            demo.install_resolver(s)
        with steps.step(f"kmskeys get {NAME} through the real upcall") as s:
            demo.get(s, secret)
        with steps.step("seal key: the host role wraps a key bound to its instance") as s:
            demo.seal(s)
        with steps.step("kmskeys-resolver uninstall") as s:
            demo.uninstall(s)
        with steps.step("terraform destroy") as s:
            demo.destroy(s)

    return run_demo(
        steps,
        body,
        cleanup_title="clean up: resolver install, terraform state, moto, temp files",
        cleanup=demo.cleanup,
        started=started,
        note=f" ({NOT_ENFORCED.split(':', maxsplit=1)[0]})",
    )


if __name__ == "__main__":
    sys.exit(main())
