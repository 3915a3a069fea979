"""API keys → owners. Open mode (the default, bound to localhost): any `tml-` key is the one local owner.
Closed mode (`--api-key` / keys file): only the listed keys, each mapped to its owner."""

from __future__ import annotations

import hashlib
from pathlib import Path

from treadle.errors import AuthError, UserError

LOCAL_OWNER = "local"


def owner_for_key(key: str) -> str:
    """A stable owner name that does not reveal the key (it shows up in `model_owner`)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def read_keys_file(path: Path) -> dict[str, str]:
    """Lines of `KEY [OWNER]`; `#` starts a comment. Without OWNER the owner is derived from the key."""
    keys: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        parts = raw.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) > 2:
            raise UserError(f"api_keys_file: line {lineno} must be 'KEY [OWNER]'", field="api_keys_file")
        keys[parts[0]] = parts[1] if len(parts) == 2 else owner_for_key(parts[0])
    return keys


class Authenticator:
    def __init__(self, keys: dict[str, str] | None) -> None:
        """`keys` maps each accepted key to its owner; None (or empty) = open mode."""
        for k in keys or {}:
            if not k.startswith("tml-"):
                # The official SDK refuses keys without this prefix client-side (protocol §1.2).
                raise UserError(f"api_key: keys must start with 'tml-', got {k[:8]!r}…", field="api_key")
        self._keys = dict(keys) if keys else None

    @property
    def open_mode(self) -> bool:
        return self._keys is None

    def owner(self, key: str | None) -> str:
        if not key:
            raise AuthError("X-API-Key: missing; send an API key starting with 'tml-'", field="X-API-Key")
        if self._keys is None:
            if not key.startswith("tml-"):
                raise AuthError("X-API-Key: must start with 'tml-'", field="X-API-Key")
            return LOCAL_OWNER
        owner = self._keys.get(key)
        if owner is None:
            raise AuthError("X-API-Key: this key is not accepted by this server", field="X-API-Key")
        return owner
