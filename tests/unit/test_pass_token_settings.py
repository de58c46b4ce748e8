"""The `pass:` and `token:` settings tables: what root's config may say, and what it may not."""

from __future__ import annotations

import pytest

from resolver.config import parse
from resolver.errors import ConfigError
from resolver.install import routed_backends
from resolver.registry import split_description

pytestmark = pytest.mark.unit

TOKEN = {
    "token_module": "/usr/lib/softhsm/libsofthsm2.so",
    "token_label": "kmskeys",
    "token_key_label": "seal",
    "token_pin_file": "/etc/kmskeys/token.pin",
}


def test_the_defaults() -> None:
    config = parse({})
    assert (config.pass_prefix, config.token_prefix) == ("pass", "token")
    assert (config.pass_store_dir, config.pass_gnupg_home) == (
        "{home}/.password-store",
        "{home}/.gnupg",
    )
    assert config.pass_ttl == 300  # below gpg-agent's default-cache-ttl (600 s)
    assert not config.token_configured


@pytest.mark.parametrize(
    "template",
    ["relative/store", "{home}/{HOME}", "{home}/{user!r}", "{home:>10}", "{home}/{0}", "/x/{"],
)
def test_store_templates_take_only_the_passwd_fields(template: str) -> None:
    with pytest.raises(ConfigError):
        parse({"pass_store_dir": template})
    assert parse({"pass_store_dir": "/srv/pass/{user}"}).pass_store_dir == "/srv/pass/{user}"


def test_the_deadline_share_is_a_fraction_gpg_cannot_take_all_of() -> None:
    for bad in (0, 0.05, 1.5, True, "0.5"):
        with pytest.raises(ConfigError):
            parse({"pass_deadline_share": bad})
    assert parse({"pass_deadline_share": 1}).pass_deadline_share == 1.0


def test_pass_and_token_policy_tables() -> None:
    config = parse({"pass": {"email/*": {"ttl": 60, "allow_users": ["alice"]}},
                    "token": {"db/*": {"allow_users": [33]}}})  # fmt: skip
    assert config.rule_for("email/work", "pass").ttl == 60  # type: ignore[union-attr]
    assert config.rule_for("email/work", "kms") is None
    assert config.policy_table("pass") == "pass" and config.policy_table("token") == "token"
    with pytest.raises(ConfigError):
        parse({"pass": {"x": {"scope": "machine"}}})  # scope is [stored."GLOB"]'s alone


def test_a_token_set_up_by_halves_is_refused() -> None:
    assert parse(TOKEN).token_configured
    for missing in ("token_label", "token_key_label"):
        with pytest.raises(ConfigError):
            parse({k: v for k, v in TOKEN.items() if k != missing})
    with pytest.raises(ConfigError):
        parse({**TOKEN, "token_pin_credential": "pin"})  # both PIN sources
    with pytest.raises(ConfigError):
        parse({k: v for k, v in TOKEN.items() if k != "token_pin_file"})  # none
    with pytest.raises(ConfigError):
        parse({"seal": "pkcs11"})  # the seal needs the token
    assert parse({**TOKEN, "seal": "pkcs11"}).seal == "pkcs11"
    for key, bad in (("token_key_id", "abc"), ("token_pin_credential", "a/b"),
                     ("token_label", "x" * 33), ("token_module", "relative.so")):  # fmt: skip
        with pytest.raises(ConfigError):
            parse({**TOKEN, key: bad})


def test_prefixes_must_differ_and_split_their_descriptions() -> None:
    with pytest.raises(ConfigError):
        parse({"pass_prefix": "kms"})
    config = parse({})
    assert split_description(config, "pass:email/work#field=login") == (
        "pass", "email/work", "#field=login",
    )  # fmt: skip
    assert split_description(config, "token:db/password") == ("token", "db/password", "")


def test_install_routes_backends_by_name() -> None:
    assert routed_backends("both") == ["kms", "stored"]
    assert routed_backends("kms,pass") == ["kms", "pass"]
    assert set(routed_backends("all")) >= {"kms", "stored", "pass", "token"}
    for bad in ("", "kms,nope", "pass,,token"):
        with pytest.raises(Exception) as caught:
            routed_backends(bad)
        assert "--rules" in str(caught.value)
