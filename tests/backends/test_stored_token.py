"""The `stored:` backend sealed by a token (`seal = "pkcs11"`) keeps the backend contract, and
its entries are of no use without the token: a SoftHSM2 token in SoftHSM's own configuration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resolver.config import Config, parse
from resolver.errors import RefusedError
from resolver.keystore import SEAL_PKCS11, Entry, EntryId, Keystore
from resolver.pkcs11seal import TokenRefusedError
from resolver.stored import StoredBackend
from tests.backends.contract import MemoryBudget
from tests.backends.test_stored import TestStoredBackend
from tests.support.softhsm import Token, missing, refresh_in_process, system_token

pytestmark = [pytest.mark.tokens, pytest.mark.usefixtures("as_root")]


@pytest.fixture(scope="module")
def token() -> Iterator[Token]:
    """A SoftHSM2 token the resolver's own configuration sees; deleted after."""
    lacking = missing()
    if lacking:
        pytest.fail("the token seal cannot be tested here; missing: " + "; ".join(lacking))
    with system_token() as made:
        refresh_in_process(made.module)  # this process may have initialised SoftHSM before
        yield made


class TestTokenSealedStoredBackend(TestStoredBackend):
    @pytest.fixture
    def config(self, tmp_path: Path, token: Token) -> Config:
        self.token_settings: dict[str, Any] = {
            "seal": "pkcs11",
            "token_module": token.module,
            "token_label": token.label,
            "token_key_label": token.key_label,
            "token_pin_file": str(token.write_pin(tmp_path / "token.pin")),
        }
        return parse({**self.settings(tmp_path), **self.token_settings})

    def test_an_entry_is_a_token_envelope_bound_to_its_scope_and_name(
        self, config: Config, tmp_path: Path
    ) -> None:
        request = self.known(config)
        budget = MemoryBudget()
        key = StoredBackend(config).resolve(request, self.context(budget)).payload
        # Made now: the seal read the public key once (no PIN); the key is the one just made.
        assert budget.spent == 1
        eid = EntryId("user", request.uid, request.name, 1)
        entry = Keystore(config.keystore_dir).read(eid)
        assert entry.seal == SEAL_PKCS11 and entry.seal_key_arn.startswith("pkcs11:")
        assert key not in entry.material and len(entry.material) > len(key)
        # Read again: unsealed by the token (one private operation), the same key.
        again = StoredBackend(config).resolve(request, self.context(budget)).payload
        assert again == key and budget.spent == 2
        # The material moved into an intact entry of another name does not open: the token
        # envelope binds scope and name (the seal context), not only the file's header.
        moved = EntryId("user", request.uid, request.name + "-moved", 1)
        forged = Entry(moved, entry.created, entry.key_size, entry.seal, entry.material,
                       entry.seal_key_arn)  # fmt: skip
        Keystore(config.keystore_dir).create(forged)
        with pytest.raises(TokenRefusedError) as caught:
            StoredBackend(config).resolve(self._request(moved.name, b"32"), self.context())
        assert "does not authenticate" in str(caught.value)

    def test_without_the_token_the_keystore_opens_nothing(
        self, config: Config, tmp_path: Path
    ) -> None:
        request = self.known(config)
        key = StoredBackend(config).resolve(request, self.context()).payload
        # A copied keystore on a host without this token (another token, same labels absent).
        elsewhere = parse(
            {**self.settings_of(config), **self.token_settings, "token_label": "kmst-no-token"}
        )
        with pytest.raises(Exception) as caught:
            StoredBackend(elsewhere).resolve(request, self.context())
        assert caught.value.answer_errno == 11  # EAGAIN: the token is not there
        assert key not in repr(caught.value).encode()
        # With the wrong PIN: refused (never retried).
        wrong = tmp_path / "wrong.pin"
        wrong.write_text("00000000\n")
        wrong.chmod(0o600)
        bad = parse({**self.settings_of(config), **self.token_settings,
                     "token_pin_file": str(wrong)})  # fmt: skip
        with pytest.raises(RefusedError):
            StoredBackend(bad).resolve(request, self.context())

    def settings_of(self, config: Config) -> dict[str, Any]:
        return {"keystore_dir": str(config.keystore_dir)}
