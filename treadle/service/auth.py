"""API keys → owners. Open mode (the default, bound to localhost): any `tml-` key is the one local owner.
Closed mode (`--api-key` / keys file): only the listed keys, each mapped to its owner.

Keys are held only as SHA-256 digests and compared in constant time (every digest is compared, no early exit);
a keys file may list `sha256:<hex>` instead of the key (`treadle keys hash` prints it), so the server's disk
need not hold the keys at all. Keys are never logged or echoed in an error. (A plain SHA-256 is enough: keys
are random 128-bit+ tokens, not passwords, so there is nothing to brute-force from a digest.)"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from treadle.errors import AuthError, UserError

LOCAL_OWNER = "local"
HASH_PREFIX = "sha256:"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def hashed(key: str) -> str:
    """The keys-file form of a key: `sha256:<64 hex digits>`."""
    return HASH_PREFIX + key_digest(key)


def _spec_digest(spec: str) -> str:
    """The digest a keys-file entry stands for: given (`sha256:<hex>`) or computed from a plain key."""
    if spec.startswith(HASH_PREFIX):
        digest = spec[len(HASH_PREFIX) :].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise UserError(
                "api_keys_file: a hashed key must be 'sha256:' + 64 hex digits", field="api_keys_file"
            )
        return digest
    if not spec.startswith("tml-"):
        # The official SDK refuses keys without this prefix client-side (protocol §1.2). Never echo the key.
        raise UserError("api_key: keys must start with 'tml-'", field="api_key")
    return key_digest(spec)


def owner_for_key(key: str) -> str:
    """A stable owner name that does not reveal the key (it shows up in `model_owner`); the same for a key and
    its `sha256:` form, so hashing a keys file keeps every owner's runs."""
    return "key-" + _spec_digest(key)[:12]


def read_keys_file(path: Path) -> dict[str, str]:
    """Lines of `KEY [OWNER]`, KEY a `tml-` key or its `sha256:<hex>` form; `#` starts a comment. Without OWNER
    the owner is derived from the key's digest."""
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
        """`keys` maps each accepted key (or its `sha256:` form) to its owner; None (or empty) = open mode."""
        self._digests: list[tuple[bytes, str]] | None = (
            [(bytes.fromhex(_spec_digest(k)), owner) for k, owner in keys.items()] if keys else None
        )

    @property
    def open_mode(self) -> bool:
        return self._digests is None

    def owner(self, key: str | None) -> str:
        if not key:
            raise AuthError("X-API-Key: missing; send an API key starting with 'tml-'", field="X-API-Key")
        if self._digests is None:
            if not key.startswith("tml-"):
                raise AuthError("X-API-Key: must start with 'tml-'", field="X-API-Key")
            return LOCAL_OWNER
        presented = hashlib.sha256(key.encode()).digest()
        owner = None
        for (
            digest,
            who,
        ) in self._digests:  # all of them, whatever matches: the time does not depend on the key
            if hmac.compare_digest(digest, presented):
                owner = who
        if owner is None:
            raise AuthError("X-API-Key: this key is not accepted by this server", field="X-API-Key")
        return owner
