"""The terraform tier: static checks always; the real terraform where this machine has it.

The static part (test_structure.py, test_checkov.py) needs no terraform. Everything else runs
the real terraform offline (tests/support/terraform.py) against moto servers on 127.0.0.1, from
a temporary copy of terraform/: the plans and the probes share the session's server, and each
applied root has one of its own (tests/terraform/applied.py says why). If terraform or the
provider mirror is missing, those files are not collected at all (no test is skipped or faked)
and the session prints one line saying what is missing: the one exception the team allows to
"fail, never skip".

Speed: terraform starts the 700 MB AWS provider (about 4 s of CPU) for every walk, so the
session starts the tier's terraform work as soon as collection is done, in background threads at
nice 10 beside the tiers that run first, and each test waits for the result it needs: `init`
once per directory, one plan for every valid variant (tests/terraform/variants.py), one for the
inputs the variables must refuse, one for the preconditions, and the `make demo-terraform` run,
which is also the tier's apply + destroy of examples/complete.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import terraform as tfsupport
from tests.support.kms_emulator import KmsEmulator
from tests.support.names import unique
from tests.terraform import applied, checkov, resend, variants
from tests.terraform.applied import Applied
from tests.terraform.events import Probe
from tests.terraform.rendered import Rendered
from tests.upcall.harness import KMSKEYS, Install, kms_stack
from tests.upcall.sources import SM_PATH, Sources, sources_installed

REPO = tfsupport.REPO
TERRAFORM = tfsupport.TERRAFORM_DIR
MODULES = TERRAFORM / "modules"
EXAMPLES = TERRAFORM / "examples"
MODULE_NAMES = ("kms-key", "encryptor-role", "resolver-host", "fleet-rotation")
DEMO = REPO / "scripts" / "demo_terraform.py"

# The files that run the real terraform; collected only where it can run.
REAL_TERRAFORM = [
    "test_apply.py",
    "test_cli.py",
    "test_demo.py",
    "test_fleet_policies.py",
    "test_moto_iam.py",
    "test_policies.py",
    "test_resend.py",
    "test_resolver_host.py",
    "test_rotation_document.py",
    "test_sources_example.py",
]
MISSING = tfsupport.missing()
collect_ignore = REAL_TERRAFORM if MISSING else []


def tf_dirs() -> list[Path]:
    """Every directory under terraform/ that holds .tf files."""
    return sorted({p.parent for p in TERRAFORM.rglob("*.tf")})


def pytest_collection_finish(session: pytest.Session) -> None:
    """One line at the start: the terraform and mirror used, or what is missing; and checkov's
    run starts (tests/terraform/checkov.py), if its tests are collected."""
    if not any(Path(item.path).is_relative_to(Path(__file__).parent) for item in session.items):
        return
    if any(Path(item.path).name == "test_checkov.py" for item in session.items):
        checkov.start()
    _start_jobs(session.items, session.config)
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
    """One line: how long the tier's terraform jobs took (they overlap); one per retried apply."""
    for note in applied.RETRIED:
        terminalreporter.write_line(f"terraform tier: {note}")
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


@dataclass
class RotationRun:
    """The rotation root applied to a moto of its own (`applied.moto`), and the real resolver
    install it flushes on this host.

    The install reads Secrets Manager and Parameter Store from its own moto server
    (tests/upcall/sources.py: secrets under `app/`, parameters under `/kmst/`). The root calls
    modules/fleet-rotation with the install's own (unique) prefixes: `sm:` and `ssm:` for the
    Secrets Manager and Parameter Store rules (with `app/` as the secrets' path prefix), `kms:`
    for kmskeys' own event; kmskeys_path is this venv's kmskeys, so that the applied document's
    commands run here for real.
    """

    install: Install
    applied: Applied
    sources: Sources


class Workspace:
    """The session's temporary root, terraform runner, moto servers and background jobs."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=unique("terraform") + "-"))
        self.tf = tfsupport.Terraform.offline(self.root)
        self.tree = tfsupport.copy_tree(self.root / "tree")
        self.moto = KmsEmulator(log=self.root / "moto.log").start()
        self.pool = ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="terraform", initializer=_below_the_tiers
        )
        self.closed = False
        self.jobs: dict[str, Future[Any]] = {}
        self.created = time.monotonic()
        # What the rotation job installs (a resolver, its moto and proxy), undone at close.
        self.stack = ExitStack()
        self.roots: list[Applied] = []
        self.serial = itertools.count()

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
        if self.closed:
            return
        self.closed = True
        for future in self.jobs.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        try:
            for root in self.roots:
                root.destroy()
        finally:
            self.stack.close()
            self.moto.stop()
            shutil.rmtree(self.root, ignore_errors=True)

    def fresh_moto(self, label: str) -> Callable[[], KmsEmulator]:
        """What starts a moto server of its own for an applied root; each is stopped at close."""

        def start() -> KmsEmulator:
            log = self.root / f"moto-{label}-{next(self.serial)}.log"
            moto = KmsEmulator(log=log).start()
            self.stack.callback(moto.stop)
            return moto

        return start

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

    def sources(self) -> Applied:
        """examples/aws-sources applied to a moto of its own (destroyed at close)."""
        start = self.fresh_moto("sources")
        run = applied.example(self.tf, self.root, start, "aws-sources", SOURCES_INPUTS)
        self.roots.append(run)
        return run

    def rotation(self) -> RotationRun:
        """A resolver install on this host, then the rotation root aimed at it."""
        emulator, proxy, key_arn = self.stack.enter_context(kms_stack())
        sources = self.stack.enter_context(sources_installed(emulator, proxy, key_arn))
        install = sources.install
        tree = tfsupport.copy_tree(self.root / "tree-rotation")
        here = self.root / "rotation"
        here.mkdir()
        inputs = {
            **ROTATION_INPUTS,
            "kmskeys_path": str(KMSKEYS),
            "secretsmanager_prefix": sources.sm_prefix,
            "secretsmanager_path_prefix": SM_PATH,
            "parameterstore_prefix": sources.ssm_prefix,
            "custom_event_prefixes": [install.prefix],
        }
        main = applied.module_root(tree, here, "fleet-rotation", "fleet", inputs)
        (here / "main.tf").write_text(main)
        run = applied.apply(self.tf, here, self.fresh_moto("rotation"), {})
        self.roots.append(run)
        return RotationRun(install, run, sources)


# examples/aws-sources: a name of its own, and a secret value made up for the run.
SOURCES_INPUTS: dict[str, Any] = {
    "name": f"kmst-src-{secrets.token_hex(3)}",
    "db_password": f"kmst-{secrets.token_urlsafe(12)}",
    "secret_recovery_window_in_days": 0,
    "fleet_tag_value": "kmst-sources",
}
# The rotation root: two hosts at a time, stop at the first failure.
ROTATION_INPUTS: dict[str, Any] = {
    "name": f"kmst-rot-{secrets.token_hex(3)}",
    "target_tag_value": "kmst-rotation",
    "max_concurrency": "2",
    "max_errors": "0",
}


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
    "sources": Workspace.sources,
    "rotation": Workspace.rotation,
    "good_plan": Workspace.good_plan,
    "invalid": _invalid,
    "preconditions": _preconditions,
    "resend lost": lambda ws: resend.lost_answer_run(ws.tf, ws.root, ws.stack),
    "resend taken": lambda ws: resend.taken_run(ws.tf, ws.root, ws.stack),
    **{f"validate {d}": _validator(d) for d in TF_DIRS},
}
# Which jobs each fixture needs, so that the session starts only what its tests will use.
FIXTURE_JOBS = {
    "demo_run": ["demo"],
    "sources_run": ["sources"],
    "rotation_run": ["rotation"],
    "good_plan": ["good_plan"],
    "invalid_diagnostics": ["invalid"],
    "precondition_diagnostics": ["preconditions"],
    "validations": [f"validate {d}" for d in TF_DIRS],
    "resend_lost": ["resend lost"],
    "resend_taken": ["resend taken"],
}


# The session's workspace once collection showed a test that waits for a job (_start_jobs).
_EARLY: list[Workspace] = []


def _below_the_tiers() -> None:
    # Each job thread, and what it starts (terraform, the provider, moto), at nice 10: on Linux
    # the nice value is per thread and a child inherits its thread's. The tiers that run
    # meanwhile keep the CPU they need; the jobs take what is idle (on two CPUs, most of one).
    os.setpriority(os.PRIO_PROCESS, 0, 10)


def _start_jobs(items: list[pytest.Item], config: pytest.Config) -> None:
    """Start, as soon as collection is done, every job a collected test will wait for: they run
    beside the tiers before this one instead of holding this tier's first test back."""
    wanted = {n for item in items for n in getattr(item, "fixturenames", ())}
    jobs = [job for fixture, js in FIXTURE_JOBS.items() if fixture in wanted for job in js]
    if MISSING or not jobs or _EARLY or config.option.collectonly:
        return
    ws = Workspace()
    _EARLY.append(ws)
    for job in JOBS:  # in JOBS' order: the longest first
        if job in jobs:
            ws.start(job)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A workspace no test of this tier used (a session stopped early) goes too."""
    while _EARLY:
        _EARLY.pop().close()


@pytest.fixture(scope="session")
def workspace() -> Iterator[Workspace]:
    ws = _EARLY[0] if _EARLY else Workspace()
    try:
        yield ws
    finally:
        ws.close()


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
def probe(workspace: Workspace) -> Iterator[Probe]:
    """EventBridge's pattern engine and input transformer, on the session's moto."""
    found = Probe(workspace.moto)
    try:
        yield found
    finally:
        found.close()


@pytest.fixture(scope="session")
def sources_run(workspace: Workspace) -> Applied:
    run: Applied = workspace.result("sources")
    return run


@pytest.fixture(scope="session")
def rotation_run(workspace: Workspace) -> RotationRun:
    run: RotationRun = workspace.result("rotation")
    return run


@pytest.fixture(scope="session")
def resend_lost(workspace: Workspace) -> resend.ResendRun:
    """The apply through a moto whose first answer to CreateDocument is lost."""
    run: resend.ResendRun = workspace.result("resend lost")
    return run


@pytest.fixture(scope="session")
def resend_taken(workspace: Workspace) -> resend.ResendRun:
    """The apply of a document whose name another document already has."""
    run: resend.ResendRun = workspace.result("resend taken")
    return run


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
