"""Shared-key handling and HMAC challenge-response proofs."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
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


def load_key(key_file: str | Path | None = None, env: Mapping[str, str] | None = None) -> bytes | None:
    """Key from a file (``key_file``, else ``MEMKV_AUTH_KEY_FILE``), else ``MEMKV_AUTH_KEY``, else None (no auth).

    Prefer the file: LMCache's admin port (``GET /env``) shows a sidecar's environment to
    anyone who can reach it, so a key passed in ``MEMKV_AUTH_KEY`` can leak there.
    """
    environ = os.environ if env is None else env
    source = "--auth-key-file"
    if not key_file and environ.get("MEMKV_AUTH_KEY_FILE", "").strip():
        key_file, source = environ["MEMKV_AUTH_KEY_FILE"].strip(), "MEMKV_AUTH_KEY_FILE"
    if key_file:
        return read_key_file(key_file, source=source)
    value = environ.get("MEMKV_AUTH_KEY", "")
    if not value.strip():
        return None
    return parse_key(value)


def read_key_file(key_file: str | Path, *, source: str = "--auth-key-file") -> bytes:
    """Read and decode a key file; errors name ``source`` (the flag, variable or field) and the path."""
    path = Path(key_file)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{source}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{source}: {path} is not a text file holding a 64-hex key") from None
    return parse_key(text, source=f"{source} {path}")


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
