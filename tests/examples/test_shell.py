"""examples/shell/nightly-job.sh: one decision per `kmskeys get` exit code.

Codes 0, 2, 3, 4 and 5 come from the real chain (resolver, emulator, fault proxy). Codes 1, 6,
7 and 8 need a full key quota, another user's key or a key expiring mid-run: those cases run
against a stand-in `kmskeys` on PATH that exits with the code under test.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.examples.conftest import BIN, EXAMPLES, SECRET_NAME
from tests.support.kms_proxy import kms_error
from tests.upcall.conftest import Install

pytestmark = pytest.mark.examples

SCRIPT = EXAMPLES / "shell" / "nightly-job.sh"


def job_env(prefix: str, name: str, kmskeys: Path, **env: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "KMSKEYS": str(kmskeys),
        "KMSKEYS_PREFIX": prefix,
        "KMSKEYS_SECRET": name,
        **env,
    }


def run_job(
    *job: str, prefix: str, name: str = SECRET_NAME, kmskeys: Path = BIN / "kmskeys", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(SCRIPT), *job],
        env=job_env(prefix, name, kmskeys, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def start_job(
    *job: str, prefix: str, name: str = SECRET_NAME, kmskeys: Path = BIN / "kmskeys", **env: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["/bin/sh", str(SCRIPT), *job],
        env=job_env(prefix, name, kmskeys, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_success_prints_the_fingerprint(install: Install) -> None:
    secret = b"nightly-" + os.urandom(8).hex().encode()
    install.deploy(SECRET_NAME, install.blob(secret, SECRET_NAME))
    done = run_job(prefix=install.prefix)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == hashlib.sha256(secret).hexdigest()[:16]
    assert secret.decode() not in done.stdout + done.stderr


def test_the_job_gets_the_secret_on_stdin_and_its_status_is_kept(
    install: Install, tmp_path: Path
) -> None:
    secret = b"stdin-" + os.urandom(8).hex().encode()
    install.deploy(SECRET_NAME, install.blob(secret, SECRET_NAME))
    out = tmp_path / "received"
    job = ["/bin/sh", "-c", f'cat > "{out}"; exit 42']
    done = run_job(*job, prefix=install.prefix)
    assert done.returncode == 42
    assert out.read_bytes() == secret


def test_invalid_name_is_ex_usage(install: Install) -> None:
    done = run_job(prefix=install.prefix, name="../etc/shadow")
    assert done.returncode == 64
    assert "invalid secret name" in done.stderr


def test_missing_name_is_ex_usage(install: Install) -> None:
    done = run_job(prefix=install.prefix, name="")
    assert done.returncode == 64
    assert "KMSKEYS_SECRET is not set" in done.stderr


def test_unknown_secret_is_ex_unavailable(install: Install) -> None:
    done = run_job(prefix=install.prefix)
    assert done.returncode == 69
    assert "unknown secret" in done.stderr


def test_refused_is_ex_noperm(install: Install) -> None:
    install.deploy(SECRET_NAME, install.blob(b"meant-for-another-name", "another-name"))
    done = run_job(prefix=install.prefix)
    assert done.returncode == 77
    assert "refused" in done.stderr


def test_unavailable_is_not_cached_a_retry_before_negative_ttl_reaches_kms(
    install: Install,
) -> None:
    secret = b"after-the-outage"
    install.deploy(SECRET_NAME, install.blob(secret, SECRET_NAME))
    assert install.proxy is not None
    install.proxy.set_fault(lambda request: kms_error("ThrottlingException"))
    # One retry, sooner than a failure cached for negative_ttl (it would live at least
    # negative_ttl - 1 s) could expire: it succeeds only because EAGAIN is not cached and the
    # retry runs the resolver, which asks KMS again.
    delay = 1
    assert delay < install.settings["negative_ttl"] - 1
    job = start_job(prefix=install.prefix, KMSKEYS_RETRIES="1", KMSKEYS_RETRY_DELAY=str(delay))
    try:
        assert "errno=EAGAIN" in install.log.wait_for(SECRET_NAME)
        install.proxy.set_fault(None)  # KMS is back before the script's retry
        out, err = job.communicate(timeout=60)
    finally:
        job.kill()
        job.wait()
    assert job.returncode == 0, err
    assert "retry 1/1" in err
    assert out.strip() == hashlib.sha256(secret).hexdigest()[:16]
    assert "outcome=ok" in install.log.wait_for(SECRET_NAME)


def test_unavailable_gives_up_with_ex_tempfail(install: Install) -> None:
    install.deploy(SECRET_NAME, install.blob(b"never-reached", SECRET_NAME))
    assert install.proxy is not None
    install.proxy.set_fault(lambda request: kms_error("ThrottlingException"))
    done = run_job(prefix=install.prefix, KMSKEYS_RETRIES="1", KMSKEYS_RETRY_DELAY="1")
    assert done.returncode == 75
    assert "retry 1/1" in done.stderr
    assert "giving up" in done.stderr


def stand_in(tmp_path: Path, codes: list[int]) -> Path:
    """A `kmskeys` that exits with codes[i] on its i-th `get` and logs every call."""
    calls = tmp_path / "calls"
    script = tmp_path / "kmskeys"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{calls}"\n'
        'case "$1" in flush) exit 0 ;; esac\n'
        f'n=$(grep -c "^get" "{calls}")\n'
        f"set -- {' '.join(map(str, codes))}\n"
        'shift $((n - 1))\nprintf stand-in-secret\nexit "$1"\n'
    )
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(
    ("code", "expected", "says"),
    [(6, 78, "kmskeys doctor"), (7, 77, "another user"), (1, 70, "status 1"), (9, 70, "status 9")],
)
def test_other_exit_codes(tmp_path: Path, code: int, expected: int, says: str) -> None:
    done = run_job(prefix="kms", kmskeys=stand_in(tmp_path, [code]))
    assert done.returncode == expected
    assert says in done.stderr


def test_expired_key_is_flushed_once_then_retried(tmp_path: Path) -> None:
    done = run_job(prefix="kms", kmskeys=stand_in(tmp_path, [8, 0]))
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["get", "flush", "get"]
    assert done.stdout.strip() == hashlib.sha256(b"stand-in-secret").hexdigest()[:16]


def test_still_expired_after_a_flush_gives_up(tmp_path: Path) -> None:
    done = run_job(prefix="kms", kmskeys=stand_in(tmp_path, [8, 8]))
    assert done.returncode == 70
    assert "still expired" in done.stderr
