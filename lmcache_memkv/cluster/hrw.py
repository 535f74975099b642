"""Rendezvous (highest-random-weight) hashing: each key ranks every node by a per-pair score.

Adding a node moves only the keys that now rank it first (about 1/N of them); removing one
moves only its own keys. No ring, no virtual nodes, no state beyond the node list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def score(node_id: str, key: bytes) -> int:
    node = node_id.encode()
    # The length prefix keeps (node "a", key "bc") apart from (node "ab", key "c").
    digest = hashlib.blake2b(len(node).to_bytes(2, "big") + node + key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(node_ids: Iterable[str], key: bytes) -> list[str]:
    """``node_ids`` from best to worst for ``key``; ties (astronomically rare) break by id."""
    return sorted(node_ids, key=lambda n: (-score(n, key), n))
