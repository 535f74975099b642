"""Shared-key handling and HMAC challenge-response proofs."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

KEY_BYTES = 32
_DATA_CONTEXT = b"memkv-data-auth-v1"


def parse_key(text: str, *, source: str = "MEMKV_AUTH_KEY") -> bytes:
    """Decode a 64-hex-character key; the error names where the key came from."""
    cleaned = text.strip()
    if len(cleaned) != KEY_BYTES * 2:
        raise ValueError(
            f"{source}: the auth key must be {KEY_BYTES * 2} hex characters ({KEY_BYTES} bytes), "
            f"got {len(cleaned)} characters (make one with `memkv keygen`)"
        )
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise ValueError(f"{source}: the auth key must be hex digits only (0-9, a-f)") from None


def load_key(key_file: str | Path | None = None, env: dict[str, str] | None = None) -> bytes | None:
    """Key from a file (if given), else ``MEMKV_AUTH_KEY``, else None (no auth)."""
    if key_file:
        path = Path(key_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"--auth-key-file: cannot read {path}: {exc.strerror}") from None
        return parse_key(text, source=f"auth key file {path}")
    environ = os.environ if env is None else env
    value = environ.get("MEMKV_AUTH_KEY", "")
    if not value.strip():
        return None
    return parse_key(value)


def new_key_hex() -> str:
    return os.urandom(KEY_BYTES).hex()


def data_proof(key: bytes, nonce: bytes) -> bytes:
    """The client's answer to a node's data-plane challenge."""
    return hmac.new(key, _DATA_CONTEXT + nonce, hashlib.sha256).digest()


def verify(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)
