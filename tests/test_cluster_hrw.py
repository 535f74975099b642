"""Rendezvous hashing: balance, and how many keys move when the membership changes."""

from __future__ import annotations

from collections import Counter

from lmcache_memkv.cluster.hrw import rank, score
from lmcache_memkv.cluster.view import ClusterView
from lmcache_memkv.control.member import Member, State

KEYS = [f"model/rank0/chunk-{i:06d}".encode() for i in range(20_000)]
NODES = ["node-a", "node-b", "node-c"]
# With 20k keys the moved fraction's standard deviation is about 0.3 points; 3 points is
# ten of them: a broken hash fails, an honest one never does.
TOLERANCE = 0.03


def owners(nodes: list[str], replicas: int = 1) -> list[tuple[str, ...]]:
    return [tuple(rank(nodes, k)[:replicas]) for k in KEYS]


def test_rank_is_a_deterministic_permutation() -> None:
    key = b"some-key"
    assert sorted(rank(NODES, key)) == sorted(NODES)
    assert rank(NODES, key) == rank(list(reversed(NODES)), key)
    assert score("ab", b"c") != score("a", b"bc")  # node/key boundary is unambiguous


def test_balance_over_three_nodes() -> None:
    counts = Counter(o[0] for o in owners(NODES))
    for node in NODES:
        assert abs(counts[node] / len(KEYS) - 1 / 3) < TOLERANCE, counts


def test_growing_three_to_four_moves_about_a_quarter_and_only_to_the_new_node() -> None:
    before = owners(NODES)
    after = owners([*NODES, "node-d"])
    moved = [(b[0], a[0]) for b, a in zip(before, after) if b != a]
    fraction = len(moved) / len(KEYS)
    print(f"HRW 3->4 nodes: {fraction:.4f} of {len(KEYS)} keys moved (ideal 0.25)")
    assert abs(fraction - 0.25) < TOLERANCE
    assert all(new == "node-d" for _, new in moved)


def test_removing_a_node_moves_only_its_keys() -> None:
    before = owners([*NODES, "node-d"])
    after = owners(NODES)
    moved = [b[0] for b, a in zip(before, after) if b != a]
    assert set(moved) == {"node-d"}
    assert abs(len(moved) / len(KEYS) - 0.25) < TOLERANCE


def test_replica_sets_change_minimally() -> None:
    """With R=2, a new fourth node enters about half of the replica sets (2 of 4 slots)."""
    before = owners(NODES, 2)
    after = owners([*NODES, "node-d"], 2)
    changed = sum(b != a for b, a in zip(before, after)) / len(KEYS)
    assert abs(changed - 0.5) < TOLERANCE
    # A survivor keeps its place relative to the other survivor: reads still find old copies.
    for b, a in zip(before, after):
        assert [n for n in a if n != "node-d"] == [n for n in b if n in a]


def test_view_places_over_alive_members_only() -> None:
    def m(node_id: str, state: State) -> Member:
        return Member(node_id, 1, state, "127.0.0.1:1", "127.0.0.1:2")

    view = ClusterView.build(7, [m("node-a", State.ALIVE), m("node-b", State.DEAD), m("node-c", State.ALIVE)])
    assert view.alive == ("node-a", "node-c")
    for key in KEYS[:100]:
        assert view.placement(key) == rank(["node-a", "node-c"], key)
