"""A client's member table, merged record by record from the views nodes send.

A client never adopts a node's whole view: a lagging node (one that has not yet heard a
verdict) would otherwise bring a DEAD member back into placement. Each record replaces the one
held only if it supersedes it (``Member.supersedes``: higher incarnation, then graver state,
with the DEAD-verdict exception), exactly as nodes merge gossip.

Forgetting: a member no view has shown for ``forget_after_s`` (the nodes dropped it) is
forgotten, so the table does not grow with every node that ever existed; it also never holds
more than ``max_members`` (new ids past that are ignored).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from lmcache_memkv.control.convert import MAX_MEMBERS
from lmcache_memkv.control.member import Member

FORGET_AFTER_S = 60.0


class MemberTable:
    def __init__(
        self,
        forget_after_s: float = FORGET_AFTER_S,
        max_members: int = 2 * MAX_MEMBERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.forget_after_s = forget_after_s
        self.max_members = max_members
        self._clock = clock
        self._members: dict[str, Member] = {}
        self._absent: dict[str, float] = {}  # node id -> when a view first left it out
        self._lock = threading.Lock()

    def merge(self, records: Iterable[Member]) -> bool:
        """Merge one node's view; True if the membership held changed (not just usage figures)."""
        now = self._clock()
        changed = False
        with self._lock:
            shown = set()
            for record in records:
                shown.add(record.node_id)
                held = self._members.get(record.node_id)
                if held is None:
                    if len(self._members) >= self.max_members:
                        continue
                    self._members[record.node_id] = record
                    changed = True
                elif record.supersedes(held):
                    self._members[record.node_id] = record
                    changed |= record.identity != held.identity
                elif record.identity == held.identity:
                    self._members[record.node_id] = record  # same life and state: fresher figures
            for node_id in list(self._members):
                if node_id in shown:
                    self._absent.pop(node_id, None)
                    continue
                since = self._absent.setdefault(node_id, now)
                if now - since >= self.forget_after_s:
                    del self._members[node_id], self._absent[node_id]
                    changed = True
        return changed

    def members(self) -> list[Member]:
        """Every member held, sorted by node id."""
        with self._lock:
            return [self._members[k] for k in sorted(self._members)]
