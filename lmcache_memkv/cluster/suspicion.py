"""Nodes this client has seen fail, skipped for a short back-off before the view catches up.

A data call that fails on a node (connect error, timeout) marks it here and fails over at
once; for ``backoff_s`` later calls skip it instead of paying the failure again. A higher
incarnation in the view (the node restarted) clears the mark at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

BACKOFF_S = 1.5


class LocalSuspicion:
    def __init__(self, backoff_s: float = BACKOFF_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff_s = backoff_s
        self._clock = clock
        self._marks: dict[str, tuple[int, float]] = {}  # node_id -> (incarnation, skip until)
        self._lock = threading.Lock()

    def mark(self, node_id: str, incarnation: int) -> bool:
        """Mark a failure; True if the node was not already marked (worth a log line)."""
        with self._lock:
            now = self._clock()
            fresh = not self._active(node_id, incarnation, now)
            self._marks[node_id] = (incarnation, now + self.backoff_s)
            return fresh

    def healthy(self, node_id: str, incarnation: int) -> bool:
        with self._lock:
            return not self._active(node_id, incarnation, self._clock())

    def suspected(self) -> dict[str, float]:
        """Node ids still in back-off, with the seconds left."""
        with self._lock:
            now = self._clock()
            return {n: round(until - now, 3) for n, (_, until) in self._marks.items() if until > now}

    def _active(self, node_id: str, incarnation: int, now: float) -> bool:
        mark = self._marks.get(node_id)
        if mark is None:
            return False
        marked_inc, until = mark
        if until <= now or incarnation > marked_inc:
            del self._marks[node_id]
            return False
        return True
