"""A single worker that takes the queued items together (up to ``max_items``), so concurrent
small requests (lookups) share one network round trip instead of queueing one behind another."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("memkv.adapter")


class Coalescer(Generic[T]):
    def __init__(self, run_batch: Callable[[list[T]], None], name: str, max_items: int) -> None:
        self._run_batch = run_batch
        self._max_items = max_items
        self._queue: list[T] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> bool:
        """Queue ``item``; False once closed (the caller then answers it itself)."""
        with self._cond:
            if self._closed:
                return False
            self._queue.append(item)
            self._cond.notify()
            return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed and drained
                batch, self._queue = self._queue[: self._max_items], self._queue[self._max_items :]
            try:
                self._run_batch(batch)
            except Exception:  # run_batch answers its items itself; never let the worker die
                log.exception("batch of %d items failed", len(batch))

    def close(self, timeout_s: float) -> None:
        """Stop taking items; those already queued are still run."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout_s)
