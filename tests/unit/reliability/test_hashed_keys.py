"""Hashed API keys: a keys file may hold `sha256:` digests instead of keys, a key and its digest stand for the
same owner, every comparison runs over all digests, and no error or owner name ever contains the key."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import pytest

from treadle import keys_cli
from treadle.errors import AuthError, UserError
from treadle.service.auth import Authenticator, hashed, owner_for_key, read_keys_file


def test_a_hashed_keys_file_authenticates_the_keys(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"{hashed('tml-alice-secret')} alice\n{hashed('tml-bob-secret')}\ntml-carol carol\n")
    keys = read_keys_file(f)
    assert "tml-alice-secret" not in f.read_text()
    auth = Authenticator(keys)
    assert auth.owner("tml-alice-secret") == "alice"
    assert auth.owner("tml-bob-secret") == owner_for_key("tml-bob-secret")  # same owner hashed or not
    assert auth.owner("tml-carol") == "carol"
    for wrong in ("tml-alice-secreT", "tml-", hashed("tml-alice-secret")):  # the digest itself is no key
        with pytest.raises(AuthError) as e:
            auth.owner(wrong)
        assert wrong not in e.value.message


@pytest.mark.parametrize("line", ["sha256:abc", "sha256:" + "g" * 64, "sk-plain owner"])
def test_malformed_entries_are_refused_without_echoing_them(tmp_path: Path, line: str) -> None:
    f = tmp_path / "keys"
    f.write_text(line + "\n")
    with pytest.raises(UserError) as e:
        Authenticator(read_keys_file(f))
    assert line.split()[0] not in e.value.message


def _keys_cli(*argv: str) -> int:
    p = argparse.ArgumentParser()
    keys_cli.register(p.add_subparsers())
    args = p.parse_args(["keys", *argv])
    return int(args.func(args))


def test_keys_cli_prints_the_line_for_a_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("tml-alice-secret\n"))
    assert _keys_cli("hash", "--owner", "alice") == 0
    assert capsys.readouterr().out == f"{hashed('tml-alice-secret')} alice\n"
    assert _keys_cli("new") == 0
    new = capsys.readouterr()
    key = new.err.strip().rsplit(" ", 1)[-1]
    assert key.startswith("tml-") and len(key) > 40 and new.out == hashed(key) + "\n"
    with pytest.raises(UserError) as e:
        _keys_cli("hash", "--key", "sk-1")
    assert "sk-1" not in e.value.message
