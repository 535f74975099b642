"""Shared-key handling and HMAC challenge-response proofs."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

KEY_BYTES = 32
_CLIENT_CONTEXT = b"memkv-data-client-v2"
_NODE_CONTEXT = b"memkv-data-node-v2"


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


def _transcript(context: bytes, node_nonce: bytes, client_nonce: bytes, node_id: str) -> bytes:
    return b"\0".join((context, node_nonce, client_nonce, node_id.encode()))


def data_client_proof(key: bytes, node_nonce: bytes, client_nonce: bytes, node_id: str) -> bytes:
    """The client's answer to a node's data-plane challenge (bound to both nonces and the node)."""
    return hmac.new(key, _transcript(_CLIENT_CONTEXT, node_nonce, client_nonce, node_id), hashlib.sha256).digest()


def data_node_proof(key: bytes, node_nonce: bytes, client_nonce: bytes, node_id: str) -> bytes:
    """The node's answer to the client's challenge: the client learns the node holds the key too.

    A different context from the client's proof, so neither side can reflect the other's.
    """
    return hmac.new(key, _transcript(_NODE_CONTEXT, node_nonce, client_nonce, node_id), hashlib.sha256).digest()


def verify(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)
