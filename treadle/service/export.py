"""External weight exports: a PEFT directory, optionally age-encrypted per file (protocol §5.10), and the
self-authorizing download tokens the SDK fetches them with (no auth header, protocol §10)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

from treadle.errors import UserError


def encrypt_dir(plain_dir: Path, out_dir: Path, recipients: list[str]) -> None:
    """Write every file of `plain_dir` to `out_dir/<name>.age`, encrypted to all `recipients`."""
    import pyrage
    from pyrage import ssh, x25519

    parsed: list[object] = []
    for r in recipients:
        try:
            if r.startswith("age1"):
                parsed.append(x25519.Recipient.from_str(r))
            else:
                parsed.append(ssh.Recipient.from_str(r))
        except Exception as e:
            raise UserError(
                f"age_encryption_recipients: {r[:20]!r}… is neither an age1… X25519 key nor an SSH public key ({e})",
                field="age_encryption_recipients",
            ) from e
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(plain_dir.rglob("*")):
        if f.is_file():
            dst = out_dir / (str(f.relative_to(plain_dir)) + ".age")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(pyrage.encrypt(f.read_bytes(), parsed))  # type: ignore[arg-type]


class UrlSigner:
    """HMAC tokens over (relative path, expiry); the secret lives in the data dir so URLs survive restarts."""

    def __init__(self, secret_file: Path) -> None:
        if not secret_file.exists():
            secret_file.parent.mkdir(parents=True, exist_ok=True)
            secret_file.write_bytes(os.urandom(32))
            secret_file.chmod(0o600)
        self._secret = secret_file.read_bytes()

    def sign(self, rel_path: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{rel_path}\n{expires}".encode(), hashlib.sha256).digest()
        return f"{expires}.{base64.urlsafe_b64encode(mac[:18]).decode()}"

    def verify(self, rel_path: str, token: str, now: float) -> bool:
        exp_s, _, _ = token.partition(".")
        # ASCII digits only, and few of them: str.isdigit() accepts '²', and int() refuses over 4300 digits.
        if not (exp_s.isascii() and exp_s.isdigit() and len(exp_s) <= 12) or int(exp_s) < now:
            return False
        return hmac.compare_digest(self.sign(rel_path, int(exp_s)), token)
