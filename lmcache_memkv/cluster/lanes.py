"""Per-node lanes: a few threads and a few call slots for each node the cluster client talks to.

A node that stops answering (SIGSTOP, a black-holed route) holds every call sent to it until
that call's deadline. With one pool shared by all nodes, enough such calls occupy every thread
and the healthy nodes' work waits in the queue until its own deadline passes: one frozen node
starves the cluster. Here each node has its own small executor, so a frozen node holds at most
its own lane's threads and work for every other node always finds one.

Each lane also has ``threads_per_node`` slots: a node call runs only while it holds one, whether
on a lane thread or on the caller's own thread (a caller runs one node's work itself when a slot
is free, which saves a thread hop per call). So one client never has more than
``threads_per_node`` calls in flight to a node, and never more connections opening to it at
once than the node's per-host handshake limit (``--max-unauth-per-host``, 8) admits. Work that
cannot get a slot before its deadline fails with ``LaneBusy``; work still queued when its caller
stops waiting is cancelled (``Future.cancel``): either way a miss for that node alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Container
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

R = TypeVar("R")

DEFAULT_THREADS_PER_NODE = 8


class LaneBusy(Exception):
    """No slot of the node's lane came free before the work's deadline."""


@dataclass
class _Lane:
    executor: ThreadPoolExecutor
    slots: threading.BoundedSemaphore


def _in_slot(slots: threading.BoundedSemaphore, fn: Callable[[], R], deadline: float) -> R:
    if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise LaneBusy("no call slot came free before the deadline")
    try:
        return fn()
    finally:
        slots.release()


class NodeLanes:
    def __init__(self, threads_per_node: int = DEFAULT_THREADS_PER_NODE) -> None:
        if threads_per_node < 1:
            raise ValueError(f"threads_per_node must be at least 1, got {threads_per_node}")
        self.threads_per_node = threads_per_node
        self._lanes: dict[str, _Lane] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _lane(self, node_id: str) -> _Lane:
        """``node_id``'s lane, made on first use; the caller holds ``_lock``."""
        if self._closed:
            raise RuntimeError("lanes closed")
        lane = self._lanes.get(node_id)
        if lane is None:
            # Threads are started on demand, so an idle or small cluster costs few of them.
            executor = ThreadPoolExecutor(max_workers=self.threads_per_node, thread_name_prefix=f"memkv-{node_id[:24]}")
            lane = self._lanes[node_id] = _Lane(executor, threading.BoundedSemaphore(self.threads_per_node))
        return lane

    def submit(self, node_id: str, fn: Callable[[], R], deadline: float) -> Future[R]:
        """Queue ``fn`` on ``node_id``'s lane, to run once it holds a slot (``LaneBusy`` if none
        comes free before ``deadline``, monotonic seconds); RuntimeError once closed."""
        with self._lock:  # submit under the lock: ``retire`` must not shut a lane between get and submit
            lane = self._lane(node_id)
            return lane.executor.submit(_in_slot, lane.slots, fn, deadline)

    def slot_here(self, node_id: str) -> threading.BoundedSemaphore | None:
        """A slot of ``node_id``'s lane for the caller's own thread if one is free now (the caller
        releases it when its call ends), else None; RuntimeError once closed."""
        with self._lock:
            slots = self._lane(node_id).slots
        return slots if slots.acquire(blocking=False) else None

    def retire(self, keep: Container[str]) -> list[str]:
        """Shut the lanes of nodes not in ``keep`` (gone, DEAD or LEFT): their queued work is
        cancelled, running calls end at their own deadline. The node ids retired."""
        with self._lock:
            gone = [n for n in self._lanes if n not in keep]
            lanes = [self._lanes.pop(n) for n in gone]
        for lane in lanes:
            lane.executor.shutdown(wait=False, cancel_futures=True)
        return gone

    def node_ids(self) -> list[str]:
        with self._lock:
            return list(self._lanes)

    def close(self) -> None:
        """Cancel all queued work and wait for the running calls (each bounded by its deadline)."""
        with self._lock:
            self._closed = True
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.executor.shutdown(wait=False, cancel_futures=True)
        for lane in lanes:
            lane.executor.shutdown(wait=True)
