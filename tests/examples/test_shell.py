"""examples/shell/nightly-job.sh: one decision per `kmskeys get` exit code, cached across runs.

Codes 0, 2, 3, 4 and 5 come from the real chain (resolver, emulator, fault proxy), and so does
the cache across runs that cron gives new session keyrings (the job caches in the user keyring).
Codes 1, 6, 7, 8 and 9 need an unclassified error, a full key quota, another user's key or a
key expiring mid-run: those cases run against a stand-in `kmskeys` that exits with the code
under test. Keys the job cached in root's user keyring are removed after each test.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmskeys import Keyring, KmsKeysError
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


@pytest.fixture(autouse=True)
def _users_keyring_cleaned(request: pytest.FixtureRequest) -> Iterator[None]:
    """The job caches in root's user keyring, shared by every root process: drop ours after."""
    if "install" not in request.fixturenames:
        yield
        return
    prefix = request.getfixturevalue("install").prefix
    yield
    ring = Keyring.user()
    for key in ring.list():
        with contextlib.suppress(KmsKeysError):  # another's key this process may not view
            if key.describe().description.startswith(f"{prefix}:"):
                key.unlink(ring)


def _resolutions(install: Install) -> int:
    """How many requests for SECRET_NAME the resolver answered since the last call."""
    install.log.collect()
    return sum(f"name={SECRET_NAME} " in line for line in install.log.drain())


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


def test_runs_in_new_session_keyrings_share_one_resolution(install: Install) -> None:
    # cron gives each run a session keyring of its own (pam_keyinit): `keyctl session -` does.
    secret = b"cron-" + os.urandom(8).hex().encode()
    install.deploy(SECRET_NAME, install.blob(secret, SECRET_NAME))
    fingerprint = hashlib.sha256(secret).hexdigest()[:16]
    for keyring, resolutions in (("user", 1), ("session", 2)):
        for _ in range(2):
            done = subprocess.run(
                ["keyctl", "session", "-", "/bin/sh", str(SCRIPT)],
                env=job_env(
                    install.prefix, SECRET_NAME, BIN / "kmskeys",
                    **({} if keyring == "user" else {"KMSKEYS_KEYRING": keyring}),
                ),
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert (done.returncode, done.stdout.strip()) == (0, fingerprint), done.stderr
        # By default the second run is a kernel hit; a session keyring asks the resolver again.
        assert _resolutions(install) == resolutions, keyring


@pytest.mark.parametrize(
    ("code", "expected", "says"),
    [
        (1, 71, "run 'kmskeys doctor --prefix kms'"),
        (6, 78, "run 'kmskeys doctor'"),
        (7, 77, "keyctl blocked, or a key this uid may not use"),
        (9, 77, "belongs to another uid"),
        (42, 70, "status 42, not one docs/cli.md lists"),
    ],
)
def test_other_exit_codes(tmp_path: Path, code: int, expected: int, says: str) -> None:
    done = run_job(prefix="kms", kmskeys=stand_in(tmp_path, [code]))
    assert done.returncode == expected
    assert says in done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["get --prefix kms --keyring user db-password"]


def test_no_kmskeys_command_is_ex_config(tmp_path: Path) -> None:
    done = run_job(prefix="kms", kmskeys=tmp_path / "no-such-kmskeys")
    assert done.returncode == 78
    assert "no kmskeys command" in done.stderr


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
