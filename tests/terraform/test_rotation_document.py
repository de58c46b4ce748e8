"""The flush document's own commands, run for real on this host: every uid gets the new value.

terraform applied modules/fleet-rotation to moto (tests/terraform/conftest.py, job "rotation"),
aimed at a real resolver install on this host, with the install's own description prefixes;
kmskeys_path is this venv's kmskeys. From what was applied, read back from moto:

1. an event as AWS delivers it goes through the applied rule's pattern and the applied
   target's input transformer (moto's EventBridge engine, tests/terraform/events.py Probe);
2. the parameters are checked as SSM checks them before it sends a command (allowedValues,
   allowedPattern, defaults), from the applied command document: moto's SendCommand checks
   nothing, so `ssm_checked` stands in for the service here;
3. the document's runCommand lines run as the SSM Agent runs them: one script, /bin/sh, as root,
   each parameter in the environment as SSM_<name> (interpolationType ENV_VAR).

Before the flush, root and another uid (tests/support/requester.py) still hold the old value;
after it, the next request of each returns the new one, for one call on the host. Each source
is real: a kms: blob redeployed for kmskeys' own event, a Secrets Manager secret rotated with
PutSecretValue for the two Secrets Manager rules (its field asked for, through the `app/` path
prefix the rules strip), a parameter overwritten with PutParameter for the Parameter Store rule.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.names import unique
from tests.support.requester import NOBODY, Steps
from tests.terraform import events
from tests.terraform.applied import REGION
from tests.terraform.conftest import ROTATION_INPUTS, RotationRun
from tests.terraform.events import Probe
from tests.upcall.harness import KMSKEYS, Install
from tests.upcall.sources import SM_PATH

pytestmark = [pytest.mark.terraform, pytest.mark.upcall]


class Rotation:
    """One source's rotation: its description, how to change its value, the event AWS then
    delivers, and the calls its re-resolution costs (KMS Decrypt, GetSecretValue...)."""

    def __init__(self, kind: str, run: RotationRun) -> None:
        sources, install = run.sources, run.install
        self.name = unique("smrotate" if kind.startswith("sm") else "rotate")
        self.counter = {"kmskeys": "Decrypt", "ssm": "GetParameter"}.get(kind, "GetSecretValue")
        self.proxy = sources.proxy
        if kind == "kmskeys":
            install.deploy(self.name, install.blob(b"kmst-old-value", self.name))
            self.desc = self.flushed = install.description(self.name)
            self.change: Callable[[], None] = lambda: install.deploy(
                self.name, install.blob(b"kmst-new-value", self.name)
            )
            self.event = events.flush_request(REGION, self.name, install.prefix)
        elif kind == "ssm":
            self.name = sources.parameter("kmst-old-value")
            self.desc = self.flushed = sources.ssm_desc(self.name)
            ssm = sources.ssm()
            self.change = lambda: ssm.put_parameter(
                Name=f"/{self.name}", Value="kmst-new-value", Overwrite=True
            )
            self.event = events.parameter_change(REGION, f"/{self.name}")
        else:
            sm = sources.sm()
            secret = f"{SM_PATH}{self.name}"
            arn = sm.create_secret(Name=secret, SecretString='{"v": "kmst-old-value"}')["ARN"]
            self.desc, self.flushed = sources.sm_desc(f"{self.name}#v"), sources.sm_desc(self.name)
            self.change = lambda: sm.put_secret_value(
                SecretId=secret, SecretString='{"v": "kmst-new-value"}'
            )
            self.event = (
                events.secrets_manager_call(REGION, "PutSecretValue", secret)
                if kind == "sm-api"
                else events.rotation_succeeded(REGION, arn)
            )

    def calls(self) -> int:
        return self.proxy.count(self.counter)


KINDS = ("kmskeys", "sm-api", "sm-rotation", "ssm")


class InvalidParameters(Exception):
    """SSM refused the parameters: no command is sent to any host."""


@pytest.fixture(scope="module")
def applied(rotation_run: RotationRun) -> dict[str, Any]:
    """The applied root read back from its moto: documents, rules and their targets, roles."""
    out = rotation_run.applied.outputs["fleet"]
    moto = rotation_run.applied.moto
    ssm, client = moto.client("ssm"), moto.client("events")
    found: dict[str, Any] = {"outputs": out, "rules": {}, "targets": {}}
    for key in ("command", "runbook"):
        name = out["command_document_name" if key == "command" else "runbook_name"]
        found[key] = json.loads(ssm.get_document(Name=name)["Content"])
    for kind, rule in out["rule_names"].items():
        found["rules"][kind] = client.describe_rule(Name=rule)["EventPattern"]
        (found["targets"][kind],) = client.list_targets_by_rule(Rule=rule)["Targets"]
    return found


@pytest.fixture
def install(rotation_run: RotationRun) -> Iterator[Install]:
    rotation_run.install.log.drain()
    yield rotation_run.install


def ssm_checked(document: dict[str, Any], given: dict[str, list[str]]) -> dict[str, str]:
    """The parameters SSM sends with the command, or InvalidParameters as SSM refuses them.

    allowedPattern is applied with re.search, the weaker of the two readings (the patterns
    are anchored with ^ and $ themselves); a String parameter takes one value.
    """
    declared = document["parameters"]
    unknown = set(given) - set(declared)
    if unknown:
        raise InvalidParameters(f"unknown parameters {sorted(unknown)}")
    checked = {}
    for name, spec in declared.items():
        if name in given:
            if len(given[name]) != 1:
                raise InvalidParameters(f"{name} takes one value")
            value = given[name][0]
        elif "default" in spec:
            value = spec["default"]
        else:
            raise InvalidParameters(f"{name} is required")
        if "allowedValues" in spec and value not in spec["allowedValues"]:
            raise InvalidParameters(f"{name} is not one of the allowed values")
        if "allowedPattern" in spec and re.search(spec["allowedPattern"], value) is None:
            raise InvalidParameters(f"{name} does not match its allowedPattern")
        checked[name] = value
    return checked


def run_document(
    document: dict[str, Any], parameters: dict[str, str], tmp: Path
) -> subprocess.CompletedProcess[str]:
    """The document's commands as the agent runs them: a root script, parameters in the env."""
    (step,) = document["mainSteps"]
    assert step["action"] == "aws:runShellScript"
    script = tmp / f"{unique('script')}.sh"
    script.write_text("\n".join(step["inputs"]["runCommand"]) + "\n")
    os.chmod(script, 0o700)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    env.update({f"SSM_{name}": value for name, value in parameters.items()})
    return subprocess.run(
        ["/bin/sh", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=int(step["inputs"]["timeoutSeconds"]),
        check=False,
    )


def fetcher(install: Install, name: str) -> Callable[[], str]:
    return described(install.description(name))


def described(desc: str) -> Callable[[], str]:
    def fetch() -> str:
        from kmskeys import Key

        return Key.request(desc, b"").read().decode()

    return fetch


@pytest.mark.parametrize("kind", KINDS)
def test_an_event_flushes_every_uid_and_the_next_request_gets_the_new_value(
    applied: dict[str, Any], rotation_run: RotationRun, probe: Probe, kind: str, tmp_path: Path
) -> None:
    rotation = Rotation(kind, rotation_run)
    fetch = described(rotation.desc)
    with Steps("root", [fetch]) as root, Steps(NOBODY, [fetch]) as other:
        assert root.ready() == other.ready() == {"ok": None}
        assert root.run(0) == other.run(0) == {"ok": "kmst-old-value"}
        before = rotation.calls()
        rotation.change()  # the rotation
        # Every uid's cached key still holds the old value: nothing told the kernel.
        assert root.run(0) == other.run(0) == {"ok": "kmst-old-value"}

        (given,) = probe.deliver(applied["rules"][kind], rotation.event, applied["targets"][kind])
        parameters = ssm_checked(applied["command"], given)
        done = run_document(applied["command"], parameters, tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"{rotation.flushed}: flushed" in done.stdout, done.stdout
        assert "kmst-old-value" not in done.stdout + done.stderr  # a flush reads no payload

        assert root.run(0) == other.run(0) == {"ok": "kmst-new-value"}
        # The host cache: one call for the host, whichever uid asked first.
        assert rotation.calls() == before + 1


# Values with a meaning to a shell: SSM's allowedPattern refuses them, and so does the script.
SHELL_HOSTILE = [
    "{name};touch {canary}",
    "{name} $(touch {canary})",
    "{name}`touch {canary}`",
    "{name}|touch {canary}",
    "{name}&&touch {canary}",
    "{name}>{canary}",
    "{name}\ntouch {canary}",
    "{name}' ; touch {canary} ; '",
    '{name}" ; touch {canary} ; "',
    "-{name}",
    "../../{name}",
    "x" * 201,
]
# Harmless to a shell, outside the name grammar all the same: the pattern (characters only)
# lets them through, the script refuses them, and so would kmskeys itself.
GRAMMAR_ONLY = ["{name}/../../etc", "{name}//x", "{name}/", "{name}/./x"]
HOSTILE = SHELL_HOSTILE + GRAMMAR_ONLY


@pytest.mark.parametrize("template", HOSTILE)
def test_a_hostile_name_is_refused_before_any_shell_runs_it(
    applied: dict[str, Any], install: Install, probe: Probe, template: str, tmp_path: Path
) -> None:
    name = unique("hostile")
    canary = tmp_path / "canary"
    hostile = template.format(name=name, canary=canary)
    install.deploy(name, install.blob(b"kmst-cached", name))
    fetch = fetcher(install, name)
    with Steps("root", [fetch]) as root:
        assert root.ready() == {"ok": None}
        assert root.run(0) == {"ok": "kmst-cached"}
        install.deploy(name, install.blob(b"kmst-not-yet", name))

        # The event as kmskeys' own rule hands it on: the transformer copies the name as is
        # (moto cannot build JSON around a quote, a backslash or a newline: those go direct).
        event = events.flush_request(REGION, hostile, install.prefix)
        if re.search(r'["\\\x00-\x1f]', hostile):
            given = {"Source": ["name"], "Id": [hostile], "Prefix": [install.prefix]}
        else:
            (given,) = probe.deliver(
                applied["rules"]["kmskeys"], event, applied["targets"]["kmskeys"]
            )
            assert given["Id"] == [hostile]
        if template in SHELL_HOSTILE:
            # SSM refuses it: the command is never sent, no host runs anything.
            with pytest.raises(InvalidParameters, match="Id does not match"):
                ssm_checked(applied["command"], given)
        else:
            ssm_checked(applied["command"], given)

        # And were SSM's check bypassed, the script refuses it before running anything: the
        # value is only ever an environment variable, checked against the name grammar.
        for source in ("name", "secretsmanager", "parameterstore"):
            parameters = {"Source": source, "Id": hostile, "Prefix": install.prefix}
            done = run_document(applied["command"], parameters, tmp_path)
            assert done.returncode == 3, (source, done.stdout, done.stderr)
            assert "refusing" in done.stderr, done.stderr
            assert "flushed" not in done.stdout, done.stdout
        assert not canary.exists()
        # Nothing was flushed: the cached key still answers with the old value.
        assert root.run(0) == {"ok": "kmst-cached"}


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("Prefix", "kms;id"),
        ("Prefix", "KMS"),
        ("Source", "name;id"),
        ("PathPrefix", "../"),
        ("PathPrefix", "prod"),
        ("JitterSeconds", "601"),
        ("JitterSeconds", "1;id"),
    ],
)
def test_every_other_parameter_is_checked_too(
    applied: dict[str, Any], install: Install, parameter: str, value: str, tmp_path: Path
) -> None:
    given = {
        "Source": ["name"],
        "Id": [unique("x")],
        "Prefix": [install.prefix],
        parameter: [value],
    }
    with pytest.raises(InvalidParameters, match=parameter):
        ssm_checked(applied["command"], given)
    parameters = {k: v[0] for k, v in given.items()}
    done = run_document(applied["command"], parameters, tmp_path)
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "refusing" in done.stderr, done.stderr


def test_the_pattern_admits_what_events_name_and_nothing_longer(
    applied: dict[str, Any], install: Install
) -> None:
    document = applied["command"]

    def accepts(value: str) -> bool:
        given = {"Source": ["name"], "Id": [value], "Prefix": [install.prefix]}
        try:
            ssm_checked(document, given)
        except InvalidParameters:
            return False
        return True

    for value in (
        "web/db",
        "a",
        "web/a web/b",
        " ".join(f"n{i}" for i in range(20)),
        "/prod/db/password",
        events.secret_arn(REGION, "prod/db"),
        "arn:aws-us-gov:secretsmanager:us-gov-west-1:123456789012:secret:x-AbC123",
        "x" * 200,
    ):
        assert accepts(value), value
    for value in (
        "",
        " ".join(f"n{i}" for i in range(21)),
        "x" * 201,
        "arn:aws:iam::123456789012:role/x",
        "//x",
        "web/db  web/a",
    ):
        assert not accepts(value), value


def test_names_are_mapped_from_secret_arns_and_paths(
    applied: dict[str, Any], install: Install, tmp_path: Path
) -> None:
    name = unique("mapped")
    install.deploy(name, install.blob(b"kmst-mapped", name))
    fetch = fetcher(install, name)
    with Steps("root", [fetch]) as root:
        assert root.ready() == {"ok": None}

        def flush(**parameters: str) -> subprocess.CompletedProcess[str]:
            assert root.run(0) == {"ok": "kmst-mapped"}  # cached again
            checked = ssm_checked(
                applied["command"],
                {"Prefix": [install.prefix], **{k: [v] for k, v in parameters.items()}},
            )
            return run_document(applied["command"], checked, tmp_path)

        # Under a path prefix: prod/NAME is the secret of kmskeys name NAME.
        done = flush(Source="secretsmanager", Id=f"prod/{name}", PathPrefix="prod/")
        assert f"{install.description(name)}: flushed" in done.stdout, done.stdout
        # A secret outside the path is not a kmskeys name: nothing is flushed.
        done = flush(Source="secretsmanager", Id=f"dev/{name}", PathPrefix="prod/")
        assert done.returncode == 0 and "nothing to flush" in done.stdout, done.stdout
        assert "flushed" not in done.stdout
        # A full ARN of a secret under the path, and a parameter name with its leading /.
        arn = events.secret_arn(REGION, f"prod/{name}")
        done = flush(Source="secretsmanager", Id=arn, PathPrefix="prod/")
        assert f"{install.description(name)}: flushed" in done.stdout, done.stdout
        done = flush(Source="parameterstore", Id=f"/prod/{name}", PathPrefix="prod/")
        assert f"{install.description(name)}: flushed" in done.stdout, done.stdout
        # Jitter: the flush waits at most JitterSeconds.
        done = flush(Source="name", Id=name, JitterSeconds="1")
        assert f"{install.description(name)}: flushed" in done.stdout, done.stdout


def test_an_agent_without_env_var_parameters_runs_nothing(
    applied: dict[str, Any], tmp_path: Path
) -> None:
    done = run_document(applied["command"], {}, tmp_path)
    assert done.returncode == 2
    assert "SSM Agent >= 3.3.2746.0" in done.stderr


# --- the rest of what was applied ------------------------------------------------------------


def test_the_runbook_sends_the_document_to_the_tag_with_the_rate_controls(
    applied: dict[str, Any], rotation_run: RotationRun
) -> None:
    runbook, command = applied["runbook"], applied["command"]
    out = applied["outputs"]
    assert runbook["schemaVersion"] == "0.3"
    assert runbook["assumeRole"] == out["automation_role_arn"]
    # The runbook checks the same patterns before it starts (StartAutomationExecution).
    for name, spec in runbook["parameters"].items():
        expected = {
            k: v for k, v in command["parameters"][name].items() if k != "interpolationType"
        }
        assert spec == expected, name
    (step,) = runbook["mainSteps"]
    assert step["action"] == "aws:runCommand"
    assert step["inputs"] == {
        "DocumentName": out["command_document_name"],
        "Targets": [{"Key": "tag:kmskeys-fleet", "Values": [ROTATION_INPUTS["target_tag_value"]]}],
        "MaxConcurrency": ROTATION_INPUTS["max_concurrency"],
        "MaxErrors": ROTATION_INPUTS["max_errors"],
        "TimeoutSeconds": 120,
        "Parameters": {name: [f"{{{{ {name} }}}}"] for name in command["parameters"]},
    }
    # The root aimed the document at this host's kmskeys and the install's prefix.
    assert f"KMSKEYS='{KMSKEYS}'" in command["mainSteps"][0]["inputs"]["runCommand"]
    template = applied["targets"]["sm-api"]["InputTransformer"]["InputTemplate"]
    given = json.loads(template.replace("<id>", "x"))
    assert given["Prefix"] == [rotation_run.sources.sm_prefix]
    assert given["PathPrefix"] == [SM_PATH]


def test_eventbridge_may_start_this_runbook_only_for_these_rules(
    applied: dict[str, Any], rotation_run: RotationRun
) -> None:
    out = applied["outputs"]
    iam = rotation_run.applied.moto.client("iam")
    role = iam.get_role(RoleName=out["events_role_arn"].rsplit("/", 1)[1])["Role"]
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    (statement,) = trust["Statement"]
    assert statement["Principal"] == {"Service": "events.amazonaws.com"}
    source_arns = statement["Condition"]["ArnEquals"]["aws:SourceArn"]
    assert sorted(source_arns if isinstance(source_arns, list) else [source_arns]) == sorted(
        out["rule_arns"].values()
    )
    for kind, target in applied["targets"].items():
        assert target["RoleArn"] == out["events_role_arn"], kind
        assert target["Arn"].endswith(f":automation-definition/{out['runbook_name']}:$DEFAULT")
    policy = iam.get_role_policy(RoleName=role["RoleName"], PolicyName="kmskeys-fleet-flush")
    document = policy["PolicyDocument"]
    document = json.loads(document) if isinstance(document, str) else document
    by_sid = {s["Sid"]: s for s in document["Statement"]}
    assert sorted(by_sid) == ["PassTheRunbookItsRole", "StartTheRolloutRunbook"]
    assert by_sid["PassTheRunbookItsRole"]["Resource"] == out["automation_role_arn"]
    assert by_sid["PassTheRunbookItsRole"]["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ssm.amazonaws.com"}
    }
    assert by_sid["StartTheRolloutRunbook"]["Resource"].endswith(
        f":automation-definition/{out['runbook_name']}:*"
    )
