"""Node statistics for Maintenance.Status, and their cluster-wide sum."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from lmcache_memkv.proto.memkv.v1 import maintenance_pb2

# Store counters copied as they are; hit_ratio and the op figures are derived.
_COUNTERS = (
    "capacity_bytes",
    "used_bytes",
    "value_bytes",
    "keys",
    "leases",
    "hits",
    "misses",
    "evictions",
    "evicted_bytes",
    "leases_granted",
    "leases_released",
    "leases_expired",
    "no_space",
)


class RateMeter:
    """Operations per second over a sliding window of (time, running total) samples."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def sample(self, total: int) -> float:
        """Record the running total now; the rate over the window."""
        now = self._clock()
        with self._lock:
            self._samples.append((now, total))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self._window_s:
                self._samples.popleft()  # keep one sample at or beyond the window's start
            t0, n0 = self._samples[0]
            return (total - n0) / (now - t0) if now > t0 else 0.0


def hit_ratio(hits: int, misses: int) -> float:
    return hits / (hits + misses) if hits + misses else 0.0


def node_stats(store: Mapping[str, int], ops_total: int, ops_per_second: float) -> maintenance_pb2.NodeStats:
    fields = {name: int(store.get(name, 0)) for name in _COUNTERS}
    return maintenance_pb2.NodeStats(
        **fields,
        hit_ratio=hit_ratio(fields["hits"], fields["misses"]),
        ops_total=ops_total,
        ops_per_second=ops_per_second,
    )


def total(parts: Iterable[maintenance_pb2.NodeStats]) -> maintenance_pb2.NodeStats:
    out = maintenance_pb2.NodeStats()
    for p in parts:
        for name in (*_COUNTERS, "ops_total"):
            setattr(out, name, getattr(out, name) + getattr(p, name))
        out.ops_per_second += p.ops_per_second
    out.hit_ratio = hit_ratio(out.hits, out.misses)
    return out


def stats_dict(stats: maintenance_pb2.NodeStats) -> dict[str, int | float]:
    """Every field by name, for JSON and for ClusterClient.node_stats()."""
    return {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields}
