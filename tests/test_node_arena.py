"""Arena allocator: alignment, best fit, coalescing, exhaustion; random alloc/free keeps its invariants."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcache_memkv.node.arena import ALIGN, Arena, align_up


@pytest.fixture
def arena() -> Iterator[Arena]:
    a = Arena(16 * ALIGN)
    try:
        yield a
    finally:
        a.close()


def free_extents(a: Arena) -> list[tuple[int, int]]:
    """The free extents, coalesced (the top region last)."""
    return a.free_extents()


def coalesced(a: Arena) -> list[tuple[int, int]]:
    """The coalesced free extents as they stand (the exact-size lists not merged in), the top region last."""
    top = [(a._top, a.capacity - a._top)] if a._top < a.capacity else []
    return [(int(o), int(n)) for o, n in a._free_by_offset.items()] + top


def on_free_lists(a: Arena) -> list[tuple[int, int]]:
    return [(o, n) for n, offsets in a._quick.items() for o in offsets]


def test_capacity_is_aligned_and_validated() -> None:
    a = Arena(10 * ALIGN + 5)
    assert a.capacity == 10 * ALIGN
    a.close()
    with pytest.raises(ValueError, match="at least"):
        Arena(ALIGN - 1)


def test_alloc_aligns_and_accounts(arena: Arena) -> None:
    assert arena.alloc(1) == 0
    assert arena.alloc(ALIGN + 1) == ALIGN
    assert arena.alloc(0) == 3 * ALIGN  # empty values still get a slot
    assert arena.allocated == 4 * ALIGN
    assert free_extents(arena) == [(4 * ALIGN, 12 * ALIGN)]


def test_best_fit_prefers_the_smallest_hole_that_fits(arena: Arena) -> None:
    offs = [arena.alloc(ALIGN) for _ in range(16)]
    # Holes of 3, 1 and 2 slots (lowest offset first), separated by live extents.
    for i in (0, 1, 2, 4, 6, 7):
        arena.free(offs[i], ALIGN)
    assert free_extents(arena) == [(0, 3 * ALIGN), (4 * ALIGN, ALIGN), (6 * ALIGN, 2 * ALIGN)]
    assert arena.alloc(2 * ALIGN) == 6 * ALIGN  # the 2-slot hole, not the first 3-slot one
    assert arena.alloc(ALIGN) == 4 * ALIGN  # the exact 1-slot hole
    assert arena.alloc(ALIGN) == 0  # then the remaining 3-slot hole, split from its start
    assert free_extents(arena) == [(ALIGN, 2 * ALIGN)]


def test_free_coalesces_with_both_neighbours(arena: Arena) -> None:
    a, b, c = arena.alloc(ALIGN), arena.alloc(2 * ALIGN), arena.alloc(ALIGN)
    assert (a, b, c) == (0, ALIGN, 3 * ALIGN)
    arena.free(a, ALIGN)
    arena.free(c, ALIGN)  # merges with the free tail
    assert free_extents(arena) == [(0, ALIGN), (3 * ALIGN, 13 * ALIGN)]
    arena.free(b, 2 * ALIGN)  # merges left and right: one extent again
    assert free_extents(arena) == [(0, 16 * ALIGN)]
    assert arena.largest_free() == arena.capacity and arena.allocated == 0


def test_exhaustion_and_fragmentation(arena: Arena) -> None:
    offs = [arena.alloc(ALIGN) for _ in range(16)]
    assert arena.alloc(1) is None and arena.largest_free() == 0
    for o in offs[::2]:
        arena.free(o, ALIGN)
    assert arena.allocated == 8 * ALIGN
    assert arena.alloc(2 * ALIGN) is None  # 8 free slots, none adjacent
    assert arena.alloc(arena.capacity + 1) is None


def test_view_is_the_mapping(arena: Arena) -> None:
    off = arena.alloc(5)
    assert off is not None
    arena.view[off : off + 5] = b"hello"
    assert bytes(arena.view[off : off + 5]) == b"hello"
    assert arena.address != 0


@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0, 1, ALIGN, ALIGN + 1, 3 * ALIGN]) | st.integers(0, 5 * ALIGN)), max_size=80))
def test_random_alloc_free_keeps_invariants(ops: list[tuple[bool, int]]) -> None:
    a = Arena(64 * ALIGN)
    live: dict[int, int] = {}
    try:
        for i, (do_alloc, size) in enumerate(ops):
            if do_alloc or not live:
                off = a.alloc(size)
                if off is None:
                    assert a.largest_free() < align_up(max(size, 1))  # nothing fits even coalesced
                    continue
                assert off % ALIGN == 0
                live[off] = size
            else:
                off = sorted(live)[i % len(live)]
                a.free(off, live.pop(off))
            # Live extents, free extents and those on the exact-size lists tile the arena exactly;
            # no two coalesced free extents are adjacent.
            spans = sorted([(o, align_up(max(n, 1))) for o, n in live.items()] + coalesced(a) + on_free_lists(a))
            pos = 0
            for o, n in spans:
                assert o == pos
                pos += n
            assert pos == a.capacity
            frees = coalesced(a)
            assert all(o1 + n1 < o2 for (o1, n1), (o2, _) in itertools.pairwise(frees))
            assert a.allocated == sum(align_up(max(n, 1)) for n in live.values())
            assert a._quick_bytes == sum(n for _, n in on_free_lists(a))
            assert sorted((n, o) for o, n in frees if o < a._top) == list(a._free_by_size)
    finally:
        a.close()


def test_a_freed_extent_is_reused_for_its_size_and_coalesced_for_another(arena: Arena) -> None:
    offs = [arena.alloc(ALIGN) for _ in range(16)]
    arena.free(offs[3], ALIGN)
    arena.free(offs[4], ALIGN)
    assert arena.alloc(ALIGN) == offs[4]  # straight off the free list of its size
    arena.free(offs[4], ALIGN)
    assert arena.alloc(2 * ALIGN) == offs[3]  # nothing of that size: the two merge first
    assert arena.alloc(1) is None and arena.allocated == arena.capacity
