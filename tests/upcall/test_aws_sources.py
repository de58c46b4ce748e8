"""`sm:` and `ssm:` through the real upcall, against the moto server over HTTP.

Root and another uid (tests/support/requester.py: a real setuid child, or euid 0 + fsuid where
this host refuses non-root upcalls) ask; the counting proxy says how many GetSecretValue and
GetParameter calls reached the service; the resolver's log line says what was served.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from kmskeys import Keyring, get_secret
from kmskeys.contract import HOSTCACHE_PERM
from tests.support.requester import NOBODY, Steps, as_user
from tests.upcall.harness import KMSKEYS, run_resolver
from tests.upcall.sources import Sources, ask

pytestmark = pytest.mark.upcall

DB = {"username": "kmst-user", "password": "kmst-sm-secret", "port": 5432, "tls": True}


def test_a_field_of_a_json_secret_for_root_and_another_uid_one_call(sources: Sources) -> None:
    name = sources.secret(DB)
    assert get_secret(f"{name}#password", prefix=sources.sm_prefix) == b"kmst-sm-secret"
    line = sources.install.log.wait_for(name)
    assert " outcome=ok source=secretsmanager " in line, line
    assert " stage=AWSCURRENT field=password " in line and " version=" in line, line
    assert "kmst-sm-secret" not in line
    # Another uid, other fields, the whole secret: the host cache's one entry serves them all.
    for ref, value in ((f"{name}#username", "kmst-user"), (f"{name}#port", "5432")):
        desc = sources.sm_desc(ref)
        assert as_user(NOBODY, lambda d=desc: ask(d).decode()) == {"ok": value}
        assert " source=hostcache " in sources.install.log.wait_for(name)
    assert as_user(NOBODY, lambda: ask(sources.sm_desc(f"{name}#tls")).decode()) == {"ok": "true"}
    Keyring.join_session()
    assert json.loads(ask(sources.sm_desc(name))) == DB
    assert sources.calls() == 1


def test_a_whole_description_reads_naturally_everywhere(sources: Sources) -> None:
    name = sources.secret(DB)
    desc = sources.sm_desc(f"{name}#password")
    assert get_secret(desc) == b"kmst-sm-secret"  # the description names its own prefix
    done = subprocess.run([str(KMSKEYS), "get", desc], capture_output=True, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, b"kmst-sm-secret"), done.stderr
    done = subprocess.run(
        [str(KMSKEYS), "get", "--prefix", sources.sm_prefix, f"{name}#username"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, b"kmst-user"), done.stderr
    script = 'printf "%s|%s" "$DB" "$(cat "$CREDENTIALS_DIRECTORY/user")"'
    desc_user = sources.sm_desc(f"{name}#username")
    done = subprocess.run(
        [
            str(KMSKEYS),
            "exec",
            "--env",
            f"DB={desc}",
            "--file",
            f"user={desc_user}",
            "--",
            "/bin/sh",
            "-c",
            script,
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, b"kmst-sm-secret|kmst-user"), done.stderr
    assert sources.calls() == 1, sources.install.log.drain()


def test_binary_secrets_and_stages(sources: Sources) -> None:
    blob = sources.secret(b"\x00kmst-binary\xff")
    assert ask(sources.sm_desc(blob)) == b"\x00kmst-binary\xff"
    name = sources.secret("kmst-first")
    first = ask(sources.sm_desc(name))
    sources.sm().put_secret_value(SecretId=f"app/{name}", SecretString="kmst-second")
    assert ask(sources.sm_desc(f"{name}#stage=AWSPREVIOUS")) == first == b"kmst-first"
    line = sources.install.log.wait_for(name)
    line = sources.install.log.wait_for(name)
    assert " stage=AWSPREVIOUS " in line, line
    # AWSCURRENT was cached before the rotation: the kernel keeps it until a flush (below).
    assert ask(sources.sm_desc(name)) == b"kmst-first"


def test_parameters_hierarchical_versions_and_labels(sources: Sources) -> None:
    name = sources.parameter("kmst-v1")
    sources.ssm().put_parameter(
        Name=f"/{name}", Value="kmst-v2", Type="SecureString", Overwrite=True
    )
    sources.ssm().label_parameter_version(Name=f"/{name}", ParameterVersion=1, Labels=["blue"])
    assert get_secret(name, prefix=sources.ssm_prefix) == b"kmst-v2"
    line = sources.install.log.wait_for(name)
    assert " source=parameterstore " in line and " version=2 " in line, line
    assert ask(sources.ssm_desc(f"{name}#1")) == b"kmst-v1"
    assert as_user(NOBODY, lambda: ask(sources.ssm_desc(f"{name}#blue")).decode()) == {
        "ok": "kmst-v1"
    }
    assert " label=blue " in sources.install.log.wait_for(name) + sources.install.log.wait_for(name)
    plain = sources.parameter("kmst-plain", kind="String")
    assert as_user(NOBODY, lambda: ask(sources.ssm_desc(plain)).decode()) == {"ok": "kmst-plain"}
    assert sources.calls("GetParameter") == 4


def test_the_host_cache_entry_is_roots_alone(sources: Sources) -> None:
    name = sources.secret(DB)
    assert ask(sources.sm_desc(f"{name}#password")) == b"kmst-sm-secret"

    def entries() -> list[list[object]]:
        from kmskeys import Key, KmsKeysError, keyutils
        from kmskeys.contract import hostcache_entry
        from kmskeys.hostflush import host_cache_ring

        ring = host_cache_ring(create=False)
        assert ring is not None
        head = hostcache_entry(sources.sm_prefix, name)
        found = []
        for serial in memoryview(keyutils.keyctl_read(ring)).cast("i").tolist():
            try:
                described = Key(serial).describe()
            except KmsKeysError:
                continue  # expired or invalidated meanwhile: another test's entry
            if described.description.startswith(head):
                found.append([described.uid, described.perm])
        return found

    # One entry for the secret (not one per field), owner root, nothing for anyone else.
    assert as_user("root", entries) == {"ok": [[0, HOSTCACHE_PERM]]}


def test_a_flush_after_a_rotation_brings_every_uid_the_new_value(sources: Sources) -> None:
    secret = sources.secret({"password": "kmst-old"})
    parameter = sources.parameter("kmst-old-parameter")
    sm_desc = sources.sm_desc(f"{secret}#password")
    ssm_desc = sources.ssm_desc(parameter)

    def both() -> list[str]:
        return [ask(sm_desc).decode(), ask(ssm_desc).decode()]

    with Steps("root", [both]) as root, Steps(NOBODY, [both]) as other:
        assert root.ready() == other.ready() == {"ok": None}
        assert root.run(0) == other.run(0) == {"ok": ["kmst-old", "kmst-old-parameter"]}
        sm, ssm = sources.sm(), sources.ssm()
        sm.put_secret_value(SecretId=f"app/{secret}", SecretString='{"password": "kmst-new"}')
        ssm.put_parameter(Name=f"/{parameter}", Value="kmst-new-parameter", Overwrite=True)
        assert root.run(0) == other.run(0) == {"ok": ["kmst-old", "kmst-old-parameter"]}
        before = (sources.calls(), sources.calls("GetParameter"))
        for ref, prefix in ((secret, sources.sm_prefix), (parameter, sources.ssm_prefix)):
            done = subprocess.run(
                [str(KMSKEYS), "flush", ref, "--prefix", prefix],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0 and "flushed" in done.stdout, done.stderr
            assert "1 host-cache entries" in done.stdout, done.stdout
        assert root.run(0) == other.run(0) == {"ok": ["kmst-new", "kmst-new-parameter"]}
        # One call per host and secret, whichever uid asked first.
        assert (sources.calls(), sources.calls("GetParameter")) == (before[0] + 1, before[1] + 1)


def test_prefetch_fills_the_entries_the_allowlists_name(sources: Sources) -> None:
    secret = sources.secret(DB)
    parameter = sources.parameter("kmst-prefetched")
    config = sources.install.root / "prefetch.toml"
    text = sources.install.config.read_text()
    text = text.replace(
        'sm_secrets = ["app/kmst-*-sm*"]', f'sm_secrets = ["app/kmst-*-sm*", "app/{secret}"]'
    ).replace('ssm_parameters = ["/kmst/*"]', f'ssm_parameters = ["/kmst/*", "/{parameter}"]')
    config.write_text(text.split("\n[")[0] + "\n")  # the settings, without the policy tables
    os.chmod(config, 0o644)
    done = run_resolver("prefetch", "--config", str(config), "--jitter", "0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"{sources.sm_desc(secret)}: cached" in lines, lines
    assert f"{sources.ssm_desc(parameter)}: cached" in lines, lines
    assert "kmst-sm-secret" not in done.stdout
    before = (sources.calls(), sources.calls("GetParameter"))
    # The first request of any uid, for any field: the host cache answers.
    assert as_user(NOBODY, lambda: ask(sources.sm_desc(f"{secret}#password")).decode()) == {
        "ok": "kmst-sm-secret"
    }
    assert " source=hostcache " in sources.install.log.wait_for(secret)
    assert ask(sources.ssm_desc(parameter)) == b"kmst-prefetched"
    assert " source=hostcache " in sources.install.log.wait_for(parameter)
    assert (sources.calls(), sources.calls("GetParameter")) == before


def test_refresh_ahead_renews_an_sm_key_in_place_with_the_rotated_value(sources: Sources) -> None:
    from kmskeys import Key
    from tests.upcall.refreshing import purge_host_cache, refresh_once

    name = sources.secret({"password": "kmst-before"})
    key = Key.request(sources.sm_desc(f"{name}#password"), b"")
    assert key.read() == b"kmst-before"
    sources.sm().put_secret_value(SecretId=f"app/{name}", SecretString='{"password": "kmst-after"}')
    purge_host_cache(sources.sm_prefix)  # as if the entry's ttl had run out
    before = sources.calls()
    done = refresh_once(sources.install)
    assert done[key.serial].startswith("renewed (ttl "), done
    # The same key, the new value: a reader never met a miss.
    assert key.read() == b"kmst-after"
    assert sources.calls() >= before + 1
    renewed = [ln for ln in sources.install.log.drain() if f" name={name} " in ln]
    assert any(" via=refresh" in ln and " version=" in ln for ln in renewed), renewed
