"""Self-fencing: a node that may have been declared DEAD drops its data before it serves again.

Writers stop counting a replica once the cluster declares it DEAD, so by then it may hold
values that were overwritten or deleted elsewhere. Two ways a node learns it may be in that
position: its own clock shows it was stalled (SIGSTOP, a VM pause, a starved host) longer than
peers wait before declaring a member DEAD, or gossip says so. Either way it wipes its store (a
miss is safe, a stale hit never is) and bumps the store's generation, so connections and writes
begun before the wipe are refused rather than served from, or into, the new life.

The data plane calls ``check()`` before every request, so a request that arrives right after a
stall is fenced before it is served, whichever thread wakes first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lmcache_memkv.node.store import Store

log = logging.getLogger("memkv.node")


class Fence:
    def __init__(self, store: Store, stall_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_beat: float | None = None  # None: no control plane beating, nothing to fence
        self._has_peers = False
        # Told (outside the fence lock) after a stall wipe, so membership can announce the new data.
        self.on_stall_wipe: Callable[[], None] | None = None

    def beat(self, has_peers: bool) -> None:
        """The heartbeat loop's pulse; ``has_peers``: some member besides us is not DEAD or LEFT."""
        self.check()
        self._has_peers = has_peers
        self._last_beat = self._clock()

    def check(self) -> None:
        """Fence now if this node stalled long enough to have been declared DEAD."""
        last = self._last_beat
        if last is None or not self._has_peers or self._clock() - last <= self.stall_after_s:
            return
        with self._lock:
            last = self._last_beat
            gap = self._clock() - (last or 0.0)
            if last is None or gap <= self.stall_after_s:
                return  # another thread fenced while we waited
            self._wipe(f"stalled for {gap:.1f}s (peers may have declared it DEAD)")
            self._last_beat = self._clock()
        if self.on_stall_wipe is not None:
            self.on_stall_wipe()

    def fence(self, reason: str) -> None:
        with self._lock:
            self._wipe(reason)

    def _wipe(self, reason: str) -> None:
        generation = self._store.wipe()
        log.warning("node dropped all its data, now generation %d: %s", generation, reason)
