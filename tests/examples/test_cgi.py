"""examples/cgi under a real lighttpd: one KMS Decrypt, then every CGI process hits the cache."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.examples.conftest import SECRET_NAME, fingerprint, lighttpd_for, page_fields
from tests.support.kms_proxy import kms_error
from tests.support.lighttpd import Lighttpd
from tests.upcall.conftest import Install

pytestmark = pytest.mark.examples


def test_cgi_processes_share_one_resolution(install: Install, cgi_server: Lighttpd) -> None:
    secret = secrets.token_urlsafe(24).encode()
    install.deploy(SECRET_NAME, install.blob(secret, SECRET_NAME))
    pids = set()
    for _ in range(5):
        status, body = cgi_server.fetch("/secret.py")
        assert status == 200, cgi_server.log()
        fields = page_fields(body)
        assert fields["fingerprint"] == fingerprint(secret)
        assert fields["size"] == str(len(secret))
        assert secret.decode() not in body
        pids.add(fields["pid"])
    assert len(pids) == 5  # five processes ...
    assert install.decrypts() == 1  # ... one KMS Decrypt
    assert "outcome=ok" in install.log.wait_for(SECRET_NAME)


def test_index_is_the_script(install: Install, cgi_server: Lighttpd) -> None:
    secret = secrets.token_urlsafe(24).encode()
    install.deploy(SECRET_NAME, install.blob(secret, SECRET_NAME))
    status, body = cgi_server.fetch("/")
    assert status == 200
    assert page_fields(body)["fingerprint"] == fingerprint(secret)


def test_unknown_secret_is_500_naming_only_the_error_class(
    install: Install, cgi_server: Lighttpd
) -> None:
    status, body = cgi_server.fetch("/secret.py")
    assert status == 500
    assert "KeyNotFoundError" in body
    assert "journalctl" not in body  # the detailed message stays in the server's log
    assert "secret.py:" in cgi_server.log()
    assert "outcome=unknown" in install.log.wait_for(SECRET_NAME)


def test_blob_for_another_name_is_refused(install: Install, cgi_server: Lighttpd) -> None:
    install.deploy(SECRET_NAME, install.blob(b"not for this name", "other-name"))
    status, body = cgi_server.fetch("/secret.py")
    assert status == 500
    assert "KeyRejectedError" in body


def test_kms_throttling_is_503_with_retry_after(install: Install, cgi_server: Lighttpd) -> None:
    install.deploy(SECRET_NAME, install.blob(b"s3cret-value", SECRET_NAME))
    assert install.proxy is not None
    install.proxy.set_fault(lambda request: kms_error("ThrottlingException"))
    status, body = cgi_server.fetch("/secret.py")
    assert status == 503
    assert "temporarily unavailable" in body


def test_config_serves_scripts_only(install: Install, cgi_server: Lighttpd) -> None:
    docroot = Path(str(cgi_server.values["docroot"]))
    (docroot / "notes.txt").write_text("not for the web")
    (docroot / "db-password.kms").write_text("blob")
    assert cgi_server.fetch("/notes.txt")[0] == 403
    assert cgi_server.fetch("/db-password.kms")[0] == 403


def test_the_secret_is_the_one_the_server_config_names(install: Install, tmp_path: Path) -> None:
    # setenv.add-environment names it, as a deployer would; the script has no name of its own.
    name = "billing/api-token"
    secret = secrets.token_urlsafe(24).encode()
    install.deploy(name, install.blob(secret, name))
    install.deploy(SECRET_NAME, install.blob(b"not this one", SECRET_NAME))
    with lighttpd_for(install, tmp_path, name) as web:
        status, body = web.fetch("/secret.py")
    assert status == 200, web.log()
    fields = page_fields(body)
    assert (fields["name"], fields["fingerprint"]) == (name, fingerprint(secret))
    assert "outcome=ok" in install.log.wait_for(name)


def test_no_name_configured_is_500_naming_the_setting(install: Install, tmp_path: Path) -> None:
    with lighttpd_for(install, tmp_path, "") as web:
        status, body = web.fetch("/secret.py")
        assert status == 500
        assert "no secret configured" in body
        assert "KMSKEYS_SECRET is not set" in web.log()
    assert install.decrypts() == 0
