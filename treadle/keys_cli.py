"""`treadle keys new|hash`: make API keys for a closed server and the `sha256:` lines of a keys file, so the
server's disk holds digests only (see treadle.service.auth)."""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any


def _new(args: argparse.Namespace) -> int:
    from treadle.service.auth import hashed

    key = "tml-" + secrets.token_urlsafe(32)
    owner = f" {args.owner}" if args.owner else ""
    print(f"key (give it to its user; it is not stored anywhere): {key}", file=sys.stderr)
    print(f"{hashed(key)}{owner}")  # the keys-file line, on stdout so it can be appended with >>
    return 0


def _hash(args: argparse.Namespace) -> int:
    from treadle.errors import UserError
    from treadle.service.auth import hashed

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    if not key.startswith("tml-"):
        raise UserError("key: API keys start with 'tml-'", field="key")
    owner = f" {args.owner}" if args.owner else ""
    print(f"{hashed(key)}{owner}")
    return 0


def register(subparsers: Any) -> None:
    k = subparsers.add_parser("keys", help="make API keys and their hashed keys-file lines")
    ks = k.add_subparsers(dest="keys_command", required=True)
    n = ks.add_parser("new", help="a new random key (stderr) and its keys-file line (stdout)")
    n.add_argument("--owner", default=None, help="owner name to write on the line (default: derived)")
    n.set_defaults(func=_new)
    h = ks.add_parser("hash", help="the keys-file line of an existing key (read from stdin unless --key)")
    h.add_argument("--key", default=None, help="the key (prefer stdin: arguments show up in `ps`)")
    h.add_argument("--owner", default=None, help="owner name to write on the line (default: derived)")
    h.set_defaults(func=_hash)
