"""Transfer slots: how many large value transfers the node's TCP movers run at once.

On loopback, and on any host where the copies into and out of socket buffers are the work, a
node that lets every worker move bytes at once keeps every stream's megabytes in flight:
they no longer fit in the CPU caches, and the threads fight over the CPUs and the GIL. A few
transfers at a time, each at full speed, move more in all (``benchmarks/node_scale.py``).
Waiters are served first come, first served: no client's transfers starve behind another's.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from lmcache_memkv.cpus import CGROUP_CPU_MAX, usable_cpus


def default_transfers(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """One transfer per CPU this process may use (``usable_cpus``), at least two."""
    return max(2, usable_cpus(cpu_max))


class TransferSlots:
    """A first-come, first-served counting semaphore whose waits end at a deadline."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"transfer slots must be at least 1, got {count}")
        self.count = count
        self._lock = threading.Lock()
        self._free = count
        self._queue: deque[threading.Lock] = deque()  # one locked gate per waiter, oldest first

    def acquire(self, deadline: float) -> bool:
        """Take a slot, waiting behind earlier callers; False if the deadline came first."""
        with self._lock:
            if self._free and not self._queue:
                self._free -= 1
                return True
            gate = threading.Lock()
            gate.acquire()
            self._queue.append(gate)
        try:
            if gate.acquire(timeout=min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX)):
                return True  # ``release`` handed its slot to us
        except BaseException:
            self._leave(gate)
            raise
        self._leave(gate)
        return False

    def _leave(self, gate: threading.Lock) -> None:
        """A waiter gives up: out of the queue, or, if a slot was handed to it as it gave up, on
        with that slot to the next."""
        with self._lock:
            try:
                self._queue.remove(gate)
            except ValueError:
                self._hand_on()

    def release(self) -> None:
        with self._lock:
            self._hand_on()

    def _hand_on(self) -> None:
        if self._queue:
            self._queue.popleft().release()  # straight to the oldest waiter: no one barges past it
        else:
            self._free += 1

    @property
    def waiting(self) -> int:
        return len(self._queue)
