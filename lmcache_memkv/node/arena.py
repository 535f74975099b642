"""The node's arena: one pre-faulted anonymous mapping and a best-fit extent allocator."""

from __future__ import annotations

import ctypes
import mmap

from sortedcontainers import SortedDict, SortedList

ALIGN = 256  # small enough not to waste space on odd sizes, large enough to keep the free lists short


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    """``capacity`` bytes of DRAM, faulted in at start so the first PUT does not page-fault."""

    def __init__(self, capacity: int) -> None:
        if capacity < ALIGN:
            raise ValueError(f"capacity must be at least {ALIGN} bytes, got {capacity}")
        self.capacity = capacity - capacity % ALIGN
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self._map = mmap.mmap(-1, self.capacity, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)
        self._free_by_offset: SortedDict = SortedDict({0: self.capacity})
        self._free_by_size: SortedList = SortedList([(self.capacity, 0)])
        self.allocated = 0

    @property
    def address(self) -> int:
        """Base address, for registering the arena with an RDMA device."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def alloc(self, size: int) -> int | None:
        """Offset of a free extent of ``size`` bytes (best fit), or None when nothing fits."""
        need = align_up(max(size, 1))
        idx = self._free_by_size.bisect_left((need, -1))
        if idx >= len(self._free_by_size):
            return None
        length, offset = self._free_by_size.pop(idx)
        del self._free_by_offset[offset]
        if length > need:
            self._insert(offset + need, length - need)
        self.allocated += need
        return int(offset)

    def free(self, offset: int, size: int) -> None:
        """Return an extent, merging it with free neighbours."""
        length = align_up(max(size, 1))
        self.allocated -= length
        idx = self._free_by_offset.bisect_left(offset)
        if idx > 0:
            prev_off, prev_len = self._free_by_offset.peekitem(idx - 1)
            if prev_off + prev_len == offset:
                self._remove(prev_off, prev_len)
                offset, length = prev_off, prev_len + length
        nxt = self._free_by_offset.get(offset + length)
        if nxt is not None:
            self._remove(offset + length, nxt)
            length += nxt
        self._insert(offset, length)

    def largest_free(self) -> int:
        return int(self._free_by_size[-1][0]) if self._free_by_size else 0

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
