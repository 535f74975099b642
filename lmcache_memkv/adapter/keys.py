"""Wire keys for LMCache ObjectKeys: every field, under an optional namespace prefix.

``{prefix}{model}@{kv_rank:x}@{group:x}@{chunk_hash hex}[@{salt}]``. LMCache forbids
``@`` in model names and salts, so the form parses back unambiguously (LIST needs that).
Keys over the wire cap collapse to ``{prefix}#{blake2b}``: stable, but not listable.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from lmcache_memkv.wire.constants import MAX_KEY_LEN

DIGEST_MARK = "#"


class KeyFields(NamedTuple):
    model_name: str
    kv_rank: int
    object_group_id: int
    chunk_hash: bytes
    cache_salt: str


def encode_key(prefix: str, f: KeyFields) -> bytes:
    text = f"{f.model_name}@{f.kv_rank:x}@{f.object_group_id:x}@{f.chunk_hash.hex()}"
    if f.cache_salt:
        text += f"@{f.cache_salt}"
    full = (prefix + text).encode()
    if len(full) <= MAX_KEY_LEN:
        return full
    digest = hashlib.blake2b(text.encode(), digest_size=32).hexdigest()
    return (prefix + DIGEST_MARK + digest).encode()


def model_prefix(prefix: str, model_name: str) -> bytes:
    """The wire prefix shared by every key of ``model_name`` (for LIST)."""
    return f"{prefix}{model_name}@".encode()


def decode_key(prefix: str, wire: bytes) -> KeyFields | None:
    """The fields of a wire key, or None for digested or foreign keys."""
    try:
        text = wire.decode()
    except UnicodeDecodeError:
        return None
    if not text.startswith(prefix):
        return None
    parts = text[len(prefix) :].split("@")
    if len(parts) not in (4, 5):  # a digested key has no "@" at all
        return None
    try:
        rank = int(parts[1], 16)
        group = int(parts[2], 16)
        chunk = bytes.fromhex(parts[3])
    except ValueError:
        return None
    if parts[1] != f"{rank:x}" or parts[2] != f"{group:x}" or parts[3] != chunk.hex():
        return None  # not in canonical form: not one of ours
    salt = parts[4] if len(parts) == 5 else ""
    if len(parts) == 5 and not salt:
        return None
    return KeyFields(parts[0], rank, group, chunk, salt)
