"""API keys → owners: open mode (any tml- key is the local owner) and closed mode (listed keys, keys file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from treadle.errors import AuthError, UserError
from treadle.service.auth import LOCAL_OWNER, Authenticator, owner_for_key, read_keys_file


def test_open_mode_accepts_any_tml_key() -> None:
    auth = Authenticator(None)
    assert auth.open_mode and auth.owner("tml-anything") == LOCAL_OWNER
    for bad in (None, "", "sk-123"):
        with pytest.raises(AuthError, match="X-API-Key"):
            auth.owner(bad)


def test_closed_mode_maps_keys_to_owners(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\ntml-a alice\ntml-b   # owner derived from the key\n\n")
    keys = read_keys_file(keys_file)
    assert keys == {"tml-a": "alice", "tml-b": owner_for_key("tml-b")}
    auth = Authenticator(keys)
    assert not auth.open_mode
    assert auth.owner("tml-a") == "alice" and auth.owner("tml-b") != "alice"
    with pytest.raises(AuthError, match="not accepted"):
        auth.owner("tml-c")
    assert "tml-b" not in owner_for_key("tml-b")  # the owner name never reveals the key


def test_bad_key_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="tml-"):
        Authenticator({"sk-1": "x"})
    bad = tmp_path / "keys"
    bad.write_text("tml-a alice extra\n")
    with pytest.raises(UserError, match="line 1"):
        read_keys_file(bad)
