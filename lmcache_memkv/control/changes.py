"""Membership changes as something coroutines on the control plane's event loop can await.

``Membership`` calls a listener (from whichever thread changed it, lock held); the listener
only schedules ``_fire`` on the loop, which completes the current future and starts a new one.
Every parked ``Watch`` awaits that one shared future: a thousand watchers cost a thousand
callbacks on one future, no threads and no polling.
"""

from __future__ import annotations

import asyncio
import contextlib

from lmcache_memkv.control.membership import Membership


class ViewChanges:
    def __init__(self, membership: Membership, loop: asyncio.AbstractEventLoop) -> None:
        self._m = membership
        self._loop = loop
        self._changed: asyncio.Future[None] | None = None  # made on the loop, at the first wait
        membership.add_listener(self._from_any_thread)

    def _from_any_thread(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the plane is shutting down
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    async def wait(self, epoch: int, timeout_s: float) -> None:
        """Return once the epoch differs from ``epoch``, the membership closes, or ``timeout_s``
        passes. The future is taken before the epoch is read, so a change in between wakes it."""
        if self._changed is None:
            self._changed = self._loop.create_future()
        changed = self._changed
        if self._m.epoch != epoch or self._m.closed:
            return
        await asyncio.wait((changed,), timeout=timeout_s)
