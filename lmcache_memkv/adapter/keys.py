"""Wire keys for LMCache ObjectKeys: every field, under an optional namespace prefix.

``{prefix}{model}@{kv_rank:x}@{group:x}@{chunk_hash hex}[@{salt}]``. LMCache forbids
``@`` in model names and salts, so the form parses back unambiguously (LIST needs that).
Keys over the wire cap collapse to ``{prefix}#{blake2b}``: stable, but not listable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple, Protocol

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


class _KeyLike(Protocol):
    """What ``encode_keys`` reads of a key: LMCache's ObjectKey, or KeyFields."""

    @property
    def model_name(self) -> str: ...
    @property
    def kv_rank(self) -> int: ...
    @property
    def object_group_id(self) -> int: ...
    @property
    def chunk_hash(self) -> bytes: ...
    @property
    def cache_salt(self) -> str: ...


def encode_keys(prefix: str, keys: Iterable[_KeyLike]) -> list[bytes]:
    """``encode_key`` for each key, read straight off the key objects: every LMCache call
    encodes a batch, and building a KeyFields per key cost as much as the formatting."""
    out: list[bytes] = []
    append = out.append
    for k in keys:
        salt = k.cache_salt
        full = (
            f"{prefix}{k.model_name}@{k.kv_rank:x}@{k.object_group_id:x}@{k.chunk_hash.hex()}@{salt}"
            if salt
            else f"{prefix}{k.model_name}@{k.kv_rank:x}@{k.object_group_id:x}@{k.chunk_hash.hex()}"
        ).encode()
        if len(full) > MAX_KEY_LEN:
            full = encode_key(prefix, KeyFields(k.model_name, k.kv_rank, k.object_group_id, k.chunk_hash, salt))
        append(full)
    return out


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
