"""examples/cgi under a real nginx + fcgiwrap: the keyring that caches the key is fcgiwrap's.

nginx runs in a session keyring of its own (tests/support/nginx.py); fcgiwrap, and so every
CGI process it forks, in the test's. One KMS Decrypt serves every request, and the test process
then finds the key in its own session keyring: that is where the CGI's request put it.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from kmskeys import get_secret
from tests.examples.conftest import SECRET_NAME, fingerprint, nginx_for, page_fields
from tests.support.kms_proxy import kms_error
from tests.support.nginx import NginxFcgiwrap
from tests.upcall.conftest import Install

pytestmark = pytest.mark.examples


def test_fcgiwrap_children_share_one_resolution_in_fcgiwrap_keyring(
    install: Install, nginx_server: NginxFcgiwrap
) -> None:
    secret = secrets.token_urlsafe(24).encode()
    install.deploy(SECRET_NAME, install.blob(secret, SECRET_NAME))
    pids = set()
    for _ in range(5):
        status, body = nginx_server.fetch("/secret.py")
        assert status == 200, nginx_server.log()
        fields = page_fields(body)
        assert fields["fingerprint"] == fingerprint(secret)
        assert fields["name"] == SECRET_NAME
        assert secret.decode() not in body
        pids.add(fields["pid"])
    assert len(pids) == 5  # five CGI processes ...
    assert install.decrypts() == 1  # ... one KMS Decrypt
    assert "outcome=ok" in install.log.wait_for(SECRET_NAME)
    # The key is in fcgiwrap's session keyring (the test's): found there, no upcall, no Decrypt.
    assert get_secret(SECRET_NAME, prefix=install.prefix) == secret
    assert install.decrypts() == 1


def test_the_secret_is_the_one_fastcgi_param_names(install: Install, tmp_path: Path) -> None:
    name = "billing/api-token"
    secret = secrets.token_urlsafe(24).encode()
    install.deploy(name, install.blob(secret, name))
    with nginx_for(install, tmp_path, name) as web:
        status, body = web.fetch("/secret.py")
    assert status == 200, web.log()
    fields = page_fields(body)
    assert (fields["name"], fields["fingerprint"]) == (name, fingerprint(secret))


def test_unavailable_is_503_logged_by_nginx_and_not_cached(
    install: Install, nginx_server: NginxFcgiwrap
) -> None:
    secret = secrets.token_urlsafe(24).encode()
    install.deploy(SECRET_NAME, install.blob(secret, SECRET_NAME))
    assert install.proxy is not None
    install.proxy.set_fault(lambda request: kms_error("ThrottlingException"))
    status, body = nginx_server.fetch("/secret.py")
    # The CGI's Status header passes through fcgiwrap and nginx; the details do not.
    assert status == 503
    assert "temporarily unavailable" in body
    assert "secret.py:" not in body
    assert "secret.py:" in nginx_server.log()  # fcgiwrap -f: CGI stderr to nginx's error log
    assert "errno=EAGAIN" in install.log.wait_for(SECRET_NAME)
    # EAGAIN is not cached: with KMS back, the very next request resolves.
    install.proxy.set_fault(None)
    status, body = nginx_server.fetch("/secret.py")
    assert status == 200, nginx_server.log()
    assert page_fields(body)["fingerprint"] == fingerprint(secret)
    # Only the script runs; nothing else under the docroot is served.
    (nginx_server.script.parent / "notes.txt").write_text("not for the web")
    for path in ("/notes.txt", "/db-password.kms", "/", "/secret.py/../notes.txt"):
        assert nginx_server.fetch(path)[0] in (400, 403, 404), path
