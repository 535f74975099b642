"""Per-node lanes: the threads that run the cluster client's node calls, a few for each node.

A node that stops answering (SIGSTOP, a black-holed route) holds every call sent to it until
that call's deadline. With one pool shared by all nodes, enough such calls occupy every thread
and the healthy nodes' work waits in the queue until its own deadline passes: one frozen node
starves the cluster. Here each node has its own small executor, so a frozen node holds at most
its own lane's threads and work for every other node always finds one. Work still queued when
its caller stops waiting is cancelled (``Future.cancel``): a miss for that node alone.

Every node call of the client runs on its node's lane, so a node sees at most
``threads_per_node`` calls of one client at once: no more connections opening together than
the node's per-host handshake limit (``--max-unauth-per-host``, 8) admits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

R = TypeVar("R")

DEFAULT_THREADS_PER_NODE = 8


class NodeLanes:
    def __init__(self, threads_per_node: int = DEFAULT_THREADS_PER_NODE) -> None:
        if threads_per_node < 1:
            raise ValueError(f"threads_per_node must be at least 1, got {threads_per_node}")
        self.threads_per_node = threads_per_node
        self._lanes: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, node_id: str, fn: Callable[[], R]) -> Future[R]:
        """Queue ``fn`` on ``node_id``'s lane (made on first use); RuntimeError once closed."""
        with self._lock:  # submit under the lock: ``retire`` must not shut a lane between get and submit
            if self._closed:
                raise RuntimeError("lanes closed")
            lane = self._lanes.get(node_id)
            if lane is None:
                # Threads are started on demand, so an idle or small cluster costs few of them.
                lane = ThreadPoolExecutor(max_workers=self.threads_per_node, thread_name_prefix=f"memkv-{node_id[:24]}")
                self._lanes[node_id] = lane
            return lane.submit(fn)

    def retire(self, keep: Container[str]) -> list[str]:
        """Shut the lanes of nodes not in ``keep`` (gone, DEAD or LEFT): their queued work is
        cancelled, running calls end at their own deadline. The node ids retired."""
        with self._lock:
            gone = [n for n in self._lanes if n not in keep]
            lanes = [self._lanes.pop(n) for n in gone]
        for lane in lanes:
            lane.shutdown(wait=False, cancel_futures=True)
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
            lane.shutdown(wait=False, cancel_futures=True)
        for lane in lanes:
            lane.shutdown(wait=True)
