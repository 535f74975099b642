"""The node's arena: one pre-faulted anonymous mapping and a best-fit extent allocator.

A freed extent first goes on a free list of its exact size, uncoalesced: LMCache stores chunks
of one size, so the next value usually takes it back in O(1), without touching the sorted maps
(which cost several microseconds per value each way). Whenever the best-fit search finds
nothing, those lists are merged into the coalesced map first, so an allocation fails only when
no coalesced free extent could hold it. The untouched top of the arena (from ``_top`` to the
end) is a bump region outside the maps: a fresh node fills it in O(1) per value, and a free
extent that reaches it merges back into it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import threading

from sortedcontainers import SortedDict, SortedList

ALIGN = 256  # small enough not to waste space on odd sizes, large enough to keep the free lists short
_PREFAULT_CHUNK = 64 << 20  # between chunks a SIGTERM gets its turn (MAP_POPULATE would block for minutes)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+; Python names it only from 3.13
_PAGE = mmap.PAGESIZE
# Left to the process itself (Python, gRPC, connection buffers) when checking --capacity.
HEADROOM = 256 << 20


class StopFlag:
    """A stop request set from a signal handler. Deliberately lock-free: a handler that takes a lock
    (``threading.Event.set``) deadlocks if the signal lands while the main thread holds that lock."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class PrefaultInterrupted(Exception):
    """The stop event was set while the arena was being faulted in."""


def mem_available(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes, or None where the kernel does not say (not Linux)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_capacity(capacity: int, available: int | None = None) -> None:
    """Refuse a ``--capacity`` this host cannot back, before any of it is allocated."""
    from lmcache_memkv.sizes import format_size

    available = mem_available() if available is None else available
    if available is None:
        return
    if capacity + HEADROOM > available:
        raise ValueError(
            f"--capacity {format_size(capacity)} does not fit in this host's available memory: "
            f"MemAvailable is {format_size(available)} and the node needs {format_size(HEADROOM)} besides its arena; "
            f"use at most --capacity {format_size(max(0, available - HEADROOM))}"
        )


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    """``capacity`` bytes of DRAM, faulted in at start so the first PUT does not page-fault."""

    def __init__(self, capacity: int, stop: StopFlag | threading.Event | None = None) -> None:
        """Map and fault in ``capacity`` bytes; raise ``PrefaultInterrupted`` if ``stop`` is set meanwhile."""
        if capacity < ALIGN:
            raise ValueError(f"capacity must be at least {ALIGN} bytes, got {capacity}")
        self.capacity = capacity - capacity % ALIGN
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        try:
            self._map = mmap.mmap(-1, self.capacity, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise MemoryError(f"--capacity {self.capacity} bytes: cannot map the arena: {exc.strerror}") from None
        try:
            self._prefault(stop)
        except PrefaultInterrupted:
            self._map.close()
            raise
        self.view = memoryview(self._map)
        self._free_by_offset: SortedDict = SortedDict()  # coalesced free extents below _top: offset -> length
        self._free_by_size: SortedList = SortedList()  # the same, as (length, offset)
        self._top = 0  # everything from here to the end is free
        self._quick: dict[int, list[int]] = {}  # aligned length -> offsets of free extents of it, uncoalesced
        self._quick_bytes = 0
        self.allocated = 0

    def _prefault(self, stop: StopFlag | threading.Event | None) -> None:
        """Fault every page in, a chunk at a time, so the first PUT does not page-fault and a
        stop request (SIGTERM during start-up) is honoured within one chunk."""
        populate = True
        for offset in range(0, self.capacity, _PREFAULT_CHUNK):
            if stop is not None and stop.is_set():
                raise PrefaultInterrupted(f"stopped after faulting in {offset} of {self.capacity} bytes")
            length = min(_PREFAULT_CHUNK, self.capacity - offset)
            if populate:
                try:
                    self._map.madvise(_MADV_POPULATE_WRITE, offset, length)
                    continue
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise MemoryError(f"--capacity: cannot fault in the arena: {exc.strerror}") from None
                    populate = False  # kernel older than 5.14: touch one byte per page instead
            self._map[offset : offset + length : _PAGE] = bytes(-(-length // _PAGE))

    @property
    def address(self) -> int:
        """Base address, for registering the arena with an RDMA device."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def alloc(self, size: int) -> int | None:
        """Offset of a free extent of ``size`` bytes (an exact-size one freed before, else best
        fit), or None when nothing fits."""
        need = align_up(max(size, 1))
        quick = self._quick.get(need)
        if quick:
            self._quick_bytes -= need
            self.allocated += need
            return quick.pop()
        offset = self._best_fit(need)
        if offset is None and self._quick_bytes:
            self.coalesce()
            offset = self._best_fit(need)
        return offset

    def _best_fit(self, need: int) -> int | None:
        idx = self._free_by_size.bisect_left((need, -1))
        if idx >= len(self._free_by_size):
            if self.capacity - self._top < need:
                return None
            offset = self._top  # no hole fits: bump the top
            self._top += need
            self.allocated += need
            return offset
        length, offset = self._free_by_size.pop(idx)
        del self._free_by_offset[offset]
        if length > need:
            self._insert(offset + need, length - need)
        self.allocated += need
        return int(offset)

    def free(self, offset: int, size: int) -> None:
        """Return an extent (onto the free list of its size; ``coalesce`` merges it later)."""
        length = align_up(max(size, 1))
        self.allocated -= length
        self._quick_bytes += length
        quick = self._quick.get(length)
        if quick is None:
            self._quick[length] = [offset]
        else:
            quick.append(offset)

    def coalesce(self) -> None:
        """Merge every extent on the exact-size free lists into the coalesced free map."""
        quick, self._quick, self._quick_bytes = self._quick, {}, 0
        for length, offsets in quick.items():
            for offset in offsets:
                self._merge(offset, length)

    def _merge(self, offset: int, length: int) -> None:
        """Put a free extent in the coalesced map, merged with its free neighbours."""
        idx = self._free_by_offset.bisect_left(offset)
        if idx > 0:
            prev_off, prev_len = self._free_by_offset.peekitem(idx - 1)
            if prev_off + prev_len == offset:
                self._remove(prev_off, prev_len)
                offset, length = prev_off, prev_len + length
        if offset + length == self._top:
            self._top = offset  # back into the top region
            return
        nxt = self._free_by_offset.get(offset + length)
        if nxt is not None:
            self._remove(offset + length, nxt)
            length += nxt
        self._insert(offset, length)

    def free_extents(self) -> list[tuple[int, int]]:
        """Every free extent as (offset, length), coalesced, lowest offset first."""
        self.coalesce()
        out = [(int(o), int(n)) for o, n in self._free_by_offset.items()]
        if self._top < self.capacity:
            out.append((self._top, self.capacity - self._top))
        return out

    def largest_free(self) -> int:
        self.coalesce()
        hole = int(self._free_by_size[-1][0]) if self._free_by_size else 0
        return max(hole, self.capacity - self._top)

    def _insert(self, offset: int, length: int) -> None:
        self._free_by_offset[offset] = length
        self._free_by_size.add((length, offset))

    def _remove(self, offset: int, length: int) -> None:
        del self._free_by_offset[offset]
        self._free_by_size.remove((length, offset))

    def close(self) -> None:
        self.view.release()
        try:
            self._map.close()
        except BufferError:  # a view is still exported (e.g. registered memory); the OS frees it at exit
            pass
