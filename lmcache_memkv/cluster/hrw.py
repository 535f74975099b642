"""Rendezvous (highest-random-weight) hashing: each key ranks every node by a per-pair score.

Adding a node moves only the keys that now rank it first (about 1/N of them); removing one
moves only its own keys. No ring, no virtual nodes, no state beyond the node list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence


def node_salt(node_id: str) -> bytes:
    """What ``score`` hashes before the key; the length prefix keeps (node "a", key "bc")
    apart from (node "ab", key "c"). Callers on a hot path compute it once per node."""
    node = node_id.encode()
    return len(node).to_bytes(2, "big") + node


def score(node_id: str, key: bytes, salt: bytes | None = None) -> int:
    data = (node_salt(node_id) if salt is None else salt) + key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def rank(node_ids: Iterable[str], key: bytes) -> list[str]:
    """``node_ids`` from best to worst for ``key``; ties (astronomically rare) break by id."""
    return sorted(node_ids, key=lambda n: (-score(n, key), n))


def rank_salted(nodes: Sequence[tuple[str, bytes]], key: bytes) -> list[str]:
    """``rank`` over ``(node_id, node_salt(node_id))`` pairs: the same order, less work per key."""
    if len(nodes) == 1:
        return [nodes[0][0]]
    blake = hashlib.blake2b
    scored = sorted((-int.from_bytes(blake(salt + key, digest_size=8).digest(), "big"), n) for n, salt in nodes)
    return [n for _, n in scored]
