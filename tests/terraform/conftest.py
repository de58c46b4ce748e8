"""The terraform tier: static checks always; the real terraform where this machine has it.

The static part (test_structure.py, test_checkov.py) needs no terraform. Everything else runs
the real terraform offline (tests/support/terraform.py) against one moto server, from a
temporary copy of terraform/. If terraform or the provider mirror is missing, those files are
not collected at all (no test is skipped or faked) and the session prints one line saying what
is missing: the one exception the team allows to "fail, never skip".

Speed: terraform starts the 700 MB AWS provider (about 4 s of CPU) for every walk, so the tier
starts its terraform work at once, in background threads, and each test waits for the result it
needs: `init` once per directory, one plan for every valid variant
(tests/terraform/variants.py), one for the inputs the variables must refuse, one for the
preconditions, and the `make demo-terraform` run, which is also the tier's apply + destroy of
examples/complete.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import terraform as tfsupport
from tests.support.kms_emulator import KmsEmulator
from tests.support.names import unique
from tests.terraform import variants
from tests.terraform.rendered import Rendered

REPO = tfsupport.REPO
TERRAFORM = tfsupport.TERRAFORM_DIR
MODULES = TERRAFORM / "modules"
EXAMPLES = TERRAFORM / "examples"
MODULE_NAMES = ("kms-key", "encryptor-role", "resolver-host")
DEMO = REPO / "scripts" / "demo_terraform.py"

# The files that run the real terraform; collected only where it can run.
REAL_TERRAFORM = [
    "test_apply.py",
    "test_cli.py",
    "test_demo.py",
    "test_moto_iam.py",
    "test_policies.py",
    "test_resolver_host.py",
]
MISSING = tfsupport.missing()
collect_ignore = REAL_TERRAFORM if MISSING else []


def tf_dirs() -> list[Path]:
    """Every directory under terraform/ that holds .tf files."""
    return sorted({p.parent for p in TERRAFORM.rglob("*.tf")})


def pytest_collection_finish(session: pytest.Session) -> None:
    """One line at the start: the terraform and mirror used, or what is missing."""
    if not any(Path(item.path).is_relative_to(Path(__file__).parent) for item in session.items):
        return
    if MISSING:
        line = f"terraform tier: the real-terraform tests are not collected: {MISSING}"
    else:
        line = f"terraform tier: real terraform, provider mirror {tfsupport.find_mirror()}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


# When each background job ran, in seconds since the workspace was made: (start, end).
TIMINGS: dict[str, tuple[float, float]] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line: how long the tier's terraform jobs took (they overlap)."""
    if TIMINGS:
        jobs = ", ".join(f"{job} {end - start:.0f} s" for job, (start, end) in TIMINGS.items())
        last = max(end for _, end in TIMINGS.values())
        terminalreporter.write_line(f"terraform tier jobs ({last:.0f} s in all): {jobs}")


# How long a background job may take (Workspace.result); a test waiting for one gets as long,
# since pytest-timeout counts the setup of the fixture that waits.
JOB_TIMEOUT = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests that wait for the demo (the longest job) last; the others meanwhile."""
    for item in items:
        if set(getattr(item, "fixturenames", ())) & set(FIXTURE_JOBS):
            item.add_marker(pytest.mark.timeout(JOB_TIMEOUT))
    waits = [i for i in items if "demo_run" in getattr(i, "fixturenames", ())]
    if waits:
        items[:] = [i for i in items if i not in waits] + waits


# --- the session's terraform work -------------------------------------------------------------


@dataclass
class DemoRun:
    """`make demo-terraform` as the tier ran it: its exit, output and the state it applied.

    The demo is the tier's apply + destroy of examples/complete: one apply per session, since
    each costs a minute of provider waits. `state` is `terraform show -json` of that apply.
    """

    done: subprocess.CompletedProcess[str]
    state: Rendered | None

    @property
    def output(self) -> str:
        return self.done.stdout + self.done.stderr


class Workspace:
    """The session's temporary root, terraform runner, moto server and background jobs."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=unique("terraform") + "-"))
        self.tf = tfsupport.Terraform.offline(self.root)
        self.tree = tfsupport.copy_tree(self.root / "tree")
        self.moto = KmsEmulator(log=self.root / "moto.log").start()
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="terraform")
        self.jobs: dict[str, Future[Any]] = {}
        self.created = time.monotonic()

    def start(self, job: str) -> Future[Any]:
        if job not in self.jobs:
            self.jobs[job] = self.pool.submit(self._timed, job)
        return self.jobs[job]

    def _timed(self, job: str) -> Any:
        started = time.monotonic()
        try:
            return JOBS[job](self)
        finally:
            TIMINGS[job] = (started - self.created, time.monotonic() - self.created)

    def result(self, job: str) -> Any:
        return self.start(job).result(timeout=JOB_TIMEOUT)

    def close(self) -> None:
        for future in self.jobs.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        self.moto.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- jobs -----------------------------------------------------------------------------------

    def validate(self, relative: str) -> dict[str, Any]:
        """init + validate -json of one directory of the copied tree."""
        directory = self.tree / relative
        self.tf.init(directory)
        done = self.tf.run(directory, "validate", "-json", "-no-color", check=False)
        result = json.loads(done.stdout)
        assert isinstance(result, dict)
        return result

    def _root(self, name: str, calls: dict[str, tuple[str, dict[str, Any]]]) -> Path:
        here = self.root / name
        here.mkdir()
        (here / "main.tf").write_text(variants.root_module(self.tree, here, calls, self.moto.url))
        self.tf.init(here)
        return here

    def good_plan(self) -> Rendered:
        """Every valid variant, planned at once; `terraform show -json` of that plan."""
        here = self._root("plan-good", variants.GOOD)
        self.tf.run(here, "plan", "-input=false", "-lock=false", "-no-color", "-out=plan.bin")
        return Rendered(self.tf.json(here, "show", "-json", "plan.bin"))

    def diagnostics(self, name: str, calls: dict[str, tuple[str, dict[str, Any]]]) -> list[Any]:
        """The error diagnostics of a plan that must fail."""
        here = self._root(name, calls)
        done = self.tf.run(here, "plan", "-input=false", "-lock=false", "-json", check=False)
        assert done.returncode == 1, f"the plan of {name} did not fail: {done.stdout[-2000:]}"
        messages = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        return [m["diagnostic"] for m in messages if m.get("type") == "diagnostic"]

    def demo(self) -> DemoRun:
        """`make demo-terraform`'s script, as make runs it, keeping the state it applied."""
        state_json = self.root / "demo-state.json"
        done = subprocess.run(
            [sys.executable, str(DEMO), "--state-json", str(state_json)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            cwd=REPO,
        )
        state = Rendered(json.loads(state_json.read_text())) if state_json.exists() else None
        return DemoRun(done, state)


def _invalid(ws: Workspace) -> list[Any]:
    return ws.diagnostics("plan-invalid", variants.INVALID)


def _preconditions(ws: Workspace) -> list[Any]:
    calls = {
        label: (module, inputs) for label, (module, inputs, _) in variants.PRECONDITION.items()
    }
    return ws.diagnostics("plan-preconditions", calls)


def _validator(relative: str) -> Callable[[Workspace], Any]:
    return lambda ws: ws.validate(relative)


TF_DIRS = [str(d.relative_to(TERRAFORM)) for d in tf_dirs()]
JOBS: dict[str, Callable[[Workspace], Any]] = {
    # The longest first: they spend most of their time waiting on the provider's waiters.
    "demo": Workspace.demo,
    "good_plan": Workspace.good_plan,
    "invalid": _invalid,
    "preconditions": _preconditions,
    **{f"validate {d}": _validator(d) for d in TF_DIRS},
}
# Which jobs each fixture needs, so that the session starts only what its tests will use.
FIXTURE_JOBS = {
    "demo_run": ["demo"],
    "good_plan": ["good_plan"],
    "invalid_diagnostics": ["invalid"],
    "precondition_diagnostics": ["preconditions"],
    "validations": [f"validate {d}" for d in TF_DIRS],
}


@pytest.fixture(scope="session")
def workspace() -> Iterator[Workspace]:
    ws = Workspace()
    try:
        yield ws
    finally:
        ws.close()


@pytest.fixture(scope="session", autouse=True)
def _start_terraform_early(request: pytest.FixtureRequest) -> None:
    """Start, at the first test of the tier, every job a collected test will wait for."""
    if MISSING:
        return
    wanted = {n for item in request.session.items for n in getattr(item, "fixturenames", ())}
    jobs = [job for fixture, js in FIXTURE_JOBS.items() if fixture in wanted for job in js]
    if not jobs:
        return
    ws: Workspace = request.getfixturevalue("workspace")
    for job in JOBS:  # in JOBS' order: the longest first
        if job in jobs:
            ws.start(job)


@pytest.fixture(scope="session")
def good_plan(workspace: Workspace) -> Rendered:
    rendered: Rendered = workspace.result("good_plan")
    return rendered


@pytest.fixture(scope="session")
def invalid_diagnostics(workspace: Workspace) -> list[Any]:
    found: list[Any] = workspace.result("invalid")
    return found


@pytest.fixture(scope="session")
def precondition_diagnostics(workspace: Workspace) -> list[Any]:
    found: list[Any] = workspace.result("preconditions")
    return found


@pytest.fixture(scope="session")
def validations(workspace: Workspace) -> dict[str, dict[str, Any]]:
    return {d: workspace.result(f"validate {d}") for d in TF_DIRS}


@pytest.fixture(scope="session")
def demo_run(workspace: Workspace) -> DemoRun:
    run: DemoRun = workspace.result("demo")
    return run


def policy_of(plan: Rendered, label: str, document: str) -> dict[str, Any]:
    """The rendered policy of `data.aws_iam_policy_document.DOCUMENT` in module call LABEL."""
    return plan.policy(f"module.{label}.data.aws_iam_policy_document.{document}")


def resource_of(plan: Rendered, label: str, address: str) -> dict[str, Any]:
    """The planned values of resource ADDRESS (e.g. aws_kms_key.this) in module call LABEL."""
    return plan.values(f"module.{label}.{address}")
