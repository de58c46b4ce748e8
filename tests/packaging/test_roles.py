"""Each role of the README's Install table, installed by its own command from the `make dist` wheel.

The pip commands are read from README.md and run as written by `sh`, with `$wheel` naming the
wheel this session built and only the venv paths (/opt/...) moved below a temporary directory;
pip sees no index and no config, and takes every dependency from the wheelhouse `make venv`
downloaded (PIP_NO_INDEX, PIP_FIND_LINKS). Then each install does its job, end to end: the CI
venv makes a key and its alias in a moto server (`kmskeys create-key`) and encrypts a blob; the
root venv's `kmskeys-resolver install` serves it through the real upcall to the application's
venv; with `[dpapi]`, the application protects and unprotects through the root venv's `stored:`
rule. The URL form (`kmskeys[resolver] @ URL#sha256=...`) is resolved against a file:// URL of
the same wheel, and refused with a wrong digest.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Iterator

import pytest

from kmskeys import Keyring
from tests.packaging.dist import Dist, background
from tests.packaging.roles import URL_FORM, Roles, install_section
from tests.stored.harness import stored_installed
from tests.support.kms_emulator import TEST_CREDENTIALS, KmsEmulator
from tests.support.names import unique
from tests.upcall.harness import installed

pytestmark = pytest.mark.upcall


@pytest.fixture(scope="module")
def roles() -> Roles:
    """Every pip command of the Install table, run once, in background (tests/packaging/dist.py)."""
    result: Roles = background.result("roles")
    return result


@pytest.fixture(scope="module")
def emulator() -> Iterator[KmsEmulator]:
    with KmsEmulator() as emu:
        yield emu


def _installed(roles: Roles, role: str) -> set[str]:
    out = subprocess.run(
        [str(roles.bin(role) / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True, text=True, timeout=60, check=True, env=roles.env,
    ).stdout  # fmt: skip
    return {line.split("==")[0].lower() for line in out.splitlines()}


def test_each_role_gets_its_extra_and_nothing_it_does_not_import(roles: Roles) -> None:
    app, ci, root = (_installed(roles, role) for role in ("app", "ci", "root"))
    assert {"kmskeys", "cffi", "cryptography"} <= app and not app & {"boto3", "botocore"}
    assert {"kmskeys", "boto3", "cryptography"} <= ci
    assert {"kmskeys", "botocore", "cryptography"} <= root and "boto3" not in root


def _app(roles: Roles, code: str) -> subprocess.CompletedProcess[bytes]:
    """Python code in the application's venv, in this test's session keyring."""
    return subprocess.run(
        [str(roles.bin("app") / "python"), "-c", code],
        capture_output=True, cwd=roles.base, timeout=60, check=False,
    )  # fmt: skip


def test_ci_encrypts_root_resolves_the_app_reads(
    roles: Roles, emulator: KmsEmulator, session_keyring: Keyring
) -> None:
    kms = {**roles.env, **TEST_CREDENTIALS, "AWS_ENDPOINT_URL": emulator.url}
    ci = str(roles.bin("ci") / "kmskeys")
    alias, name, secret = f"alias/{unique()}", unique("db"), unique("secret").encode()
    made = subprocess.run(
        [ci, "create-key", "--alias", alias], env=kms, capture_output=True, text=True, check=False
    )
    assert made.returncode == 0, made.stderr
    arn = made.stdout.strip()
    blob = subprocess.run(
        [ci, "encrypt", name, "--key-id", alias], input=secret, env=kms, capture_output=True,
        check=False,
    )  # fmt: skip
    assert blob.returncode == 0, blob.stderr
    with installed(emulator, None, arn, resolver=roles.bin("root") / "kmskeys-resolver") as root:
        root.deploy(name, blob.stdout)
        get = f"kmskeys.get_secret({name!r}, prefix={root.prefix!r})"
        done = _app(roles, f"import sys, kmskeys; sys.stdout.buffer.write({get})")
        assert (done.returncode, done.stdout) == (0, secret), done.stderr
        assert f" name={name} " in root.log.wait_for(name)


def test_dpapi_round_trip_through_the_root_venvs_stored_rule(
    roles: Roles, session_keyring: Keyring
) -> None:
    resolver = roles.bin("root") / "kmskeys-resolver"
    with stored_installed(rules="stored", resolver=resolver) as stored:
        code = (
            "import kmskeys\n"
            f"blob = kmskeys.protect(b'kmst-dpapi', name={unique('dpapi')!r}, "
            f"prefix={stored.stored_prefix!r})\n"
            f"print(kmskeys.unprotect(blob, prefix={stored.stored_prefix!r}).decode())\n"
        )
        done = _app(roles, code)
        assert (done.returncode, done.stdout) == (0, b"kmst-dpapi\n"), done.stderr


def test_the_url_form_installs_the_same_wheel(roles: Roles, dist: Dist) -> None:
    spans = URL_FORM.findall(" ".join(install_section().split()))
    assert len(spans) == 1, "the README's URL form of the root side's install"
    command, url = spans[0]
    digest = hashlib.sha256(dist.wheel.read_bytes()).hexdigest()
    assert url.rsplit("/", 1)[1].split("#")[0] == dist.wheel.name  # pip reads the tags from it
    local = f"{dist.wheel.as_uri()}#sha256={digest}"
    # In the root side's venv, resolved and checked against the digest but not installed again.
    pip = f"{roles.bin('root')}/pip install --dry-run --ignore-installed"
    done = roles.run(command.replace(url, local).replace("pip install", pip, 1))
    assert done.returncode == 0, done.stdout + done.stderr
    would = next(line for line in done.stdout.splitlines() if line.startswith("Would install"))
    words = would.split()
    assert "kmskeys-0.1.0" in words and any(w.startswith("botocore-") for w in words), would
    wrong = local.replace(digest, "0" * 64)
    tampered = roles.run(command.replace(url, wrong).replace("pip install", pip, 1))
    assert tampered.returncode != 0 and "HASH" in tampered.stderr.upper(), tampered.stderr


def test_the_readme_names_the_wheel_make_dist_builds(dist: Dist) -> None:
    named = re.findall(r"^wheel=dist/(\S+)", install_section(), re.M)
    assert named == [dist.wheel.name]
