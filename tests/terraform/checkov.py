"""checkov over terraform/, offline, started when the session starts and read when its tests run.

checkov is a minute of CPU for one run. The tier needs its report only when test_checkov.py runs,
near the middle of the session, so tests/terraform/conftest.py starts it once collection is done,
at a low CPU priority beside the other tiers, and the fixture waits for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import IO

from tests.support.terraform import REPO, TERRAFORM_DIR

# checkov lives in its own venv (mk/terraform.mk) so its pins never fight the dev dependencies.
CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
# No platform API key, no download of external checks, no guideline mapping: nothing to fetch.
OFFLINE_ENV = {"BC_SKIP_MAPPING": "TRUE", "CKV_NO_DOWNLOAD": "TRUE", "LOG_LEVEL": "WARNING"}
TIMEOUT = 600

_run: tuple[subprocess.Popen[bytes], IO[bytes], IO[bytes]] | None = None


def start() -> None:
    """Start the one checkov run of the session, if checkov is there and it has not started."""
    global _run
    if _run is not None or not CHECKOV.exists():
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "CKV_", "PRISMA"))}
    command = [str(CHECKOV), "--directory", str(TERRAFORM_DIR), "--framework", "terraform",
               "--skip-download", "--output", "json"]  # fmt: skip
    # As root (CI), in an empty network namespace: any attempt to reach out fails at once.
    if os.geteuid() == 0 and shutil.which("unshare"):
        command = ["unshare", "--net", *command]
    # Files, not pipes: the JSON report is larger than a pipe holds before anyone reads it.
    out = tempfile.TemporaryFile(prefix="kmskeys-checkov-")  # noqa: SIM115 (closed in report())
    err = tempfile.TemporaryFile(prefix="kmskeys-checkov-")  # noqa: SIM115
    process = subprocess.Popen(
        ["nice", "-n", "10", *command], env={**env, **OFFLINE_ENV},
        stdin=subprocess.DEVNULL, stdout=out, stderr=err,
    )  # fmt: skip
    _run = (process, out, err)


def report() -> tuple[int, str, str]:
    """The run's exit status, stdout and stderr (starting it now if it has not started)."""
    start()
    if _run is None:
        raise FileNotFoundError(f"{CHECKOV} is missing: run `make .venv-checkov/.installed`")
    process, out, err = _run
    try:
        process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    texts = []
    for stream in (out, err):
        stream.seek(0)
        texts.append(stream.read().decode(errors="replace"))
    return process.returncode, texts[0], texts[1]
