"""One node's view of the cluster: members, their states, the epoch, merge and failure detection.

Pure state (no sockets, an injected clock), so every rule is unit-testable:

- A record the member sent about itself (join, heartbeat, leave) is *direct* evidence: it
  resets that member's silence timer. Gossip (another node's view) only merges records.
- Records merge by SWIM precedence (``Member.supersedes``). Gossip that says this node is
  SUSPECT or DEAD, or knows a higher incarnation of it, is refuted by bumping the local
  incarnation past it.
- ``tick`` turns silence into state: ALIVE -> SUSPECT after ``suspect_after_s``,
  -> DEAD after ``dead_after_s``; LEFT and DEAD members are not timed. If this node itself
  stalled (ticks further apart than ``stall_after_s``: a pause, SIGSTOP, a starved host), the
  silence it measured is its own, so it restarts every timer instead of accusing its peers.
- The epoch grows on every change of membership (not of usage figures). Epochs travel with
  gossip like a Lamport clock, so nodes with equal views settle on equal epochs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from lmcache_memkv.control.convert import check_epoch, check_member
from lmcache_memkv.control.member import Member, State


class Membership:
    def __init__(
        self,
        local: Member,
        *,
        suspect_after_s: float,
        dead_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        stall_after_s: float | None = None,
    ) -> None:
        if not 0 < suspect_after_s < dead_after_s:
            raise ValueError(f"need 0 < suspect_after_s < dead_after_s, got {suspect_after_s}, {dead_after_s}")
        self.node_id = local.node_id
        self.suspect_after_s = suspect_after_s
        self.dead_after_s = dead_after_s
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._last_tick: float | None = None
        self._cond = threading.Condition()
        self._members: dict[str, Member] = {local.node_id: replace(local, state=State.ALIVE)}
        self._last_heard: dict[str, float] = {}
        self._epoch = 1
        self._closed = False
        # Called (lock held) when gossip says this node's current life is DEAD: writers may have
        # stopped counting it, so the node must drop its data before it rejoins (see node.fence).
        self.on_declared_dead: Callable[[], None] | None = None
        self._echo: dict[str, int] = {}  # peer -> the highest incarnation of ours its view has shown
        self._listeners: list[Callable[[], None]] = []  # see add_listener

    # ------------------------------------------------------------------ reading

    @property
    def epoch(self) -> int:
        with self._cond:
            return self._epoch

    @property
    def local(self) -> Member:
        with self._cond:
            return self._members[self.node_id]

    def get(self, node_id: str) -> Member | None:
        with self._cond:
            return self._members.get(node_id)

    def view(self) -> tuple[int, list[Member]]:
        """The epoch and every member (self included), sorted by node id."""
        with self._cond:
            return self._epoch, [self._members[k] for k in sorted(self._members)]

    def peers(self) -> list[Member]:
        with self._cond:
            return [m for k, m in sorted(self._members.items()) if k != self.node_id]

    def silence(self, node_id: str) -> float | None:
        """Seconds since this node last heard from ``node_id`` directly (None: never, or self)."""
        with self._cond:
            heard = self._last_heard.get(node_id)
            return None if heard is None else self._clock() - heard

    # ------------------------------------------------------------------ updates

    def heard_from(self, record: Member) -> bool:
        """Merge a record a member sent about itself; True if the view changed.
        ValueError (nothing changed) if an integer in it is out of range (see ``convert``)."""
        check_member(record)
        with self._cond:
            if record.node_id != self.node_id:
                self._last_heard[record.node_id] = self._clock()
            changed = self._apply(record, direct=True)
            if changed:
                self._bump(0)
            return changed

    def merge(self, epoch: int, records: Iterable[Member], source: str | None = None) -> bool:
        """Merge another node's view (gossip); True if this view changed. ``source``: the member
        whose own view this is (it then has our record as it shows; see ``writable``).
        ValueError (nothing changed) if an integer in it is out of range (see ``convert``)."""
        records = [check_member(r) for r in records]
        check_epoch(epoch)
        with self._cond:
            if source is not None and source != self.node_id:
                mine = next((r for r in records if r.node_id == self.node_id), None)
                if mine is not None and mine.incarnation > self._echo.get(source, -1):
                    self._echo[source] = mine.incarnation
            changed = False
            for record in records:
                changed |= self._apply(record, direct=False)
            if changed:
                self._bump(epoch)
            elif epoch > self._epoch and self._same_view(records):
                self._epoch = epoch  # equal views, equal epochs: lets epochs converge
                self._notify()
            return changed

    def tick(self) -> list[tuple[str, State]]:
        """Apply failure detection at the clock's current time; the transitions made."""
        now = self._clock()
        changes: list[tuple[str, State]] = []
        with self._cond:
            stalled = (
                self.stall_after_s is not None
                and self._last_tick is not None
                and now - self._last_tick > self.stall_after_s
            )
            self._last_tick = now
            if stalled:
                for node_id in self._last_heard:
                    self._last_heard[node_id] = now
                return []
            for node_id, member in list(self._members.items()):
                if node_id == self.node_id or member.state not in (State.ALIVE, State.SUSPECT):
                    continue
                silent = now - self._last_heard.get(node_id, now)
                if silent > self.dead_after_s:
                    new = State.DEAD
                elif silent > self.suspect_after_s and member.state is State.ALIVE:
                    new = State.SUSPECT
                else:
                    continue
                self._members[node_id] = replace(member, state=new)
                changes.append((node_id, new))
            if changes:
                self._bump(0)
        return changes

    def set_usage(self, capacity_bytes: int, used_bytes: int) -> None:
        """This node's own usage figures (no epoch change: they are not membership)."""
        with self._cond:
            me = self._members[self.node_id]
            self._members[self.node_id] = replace(me, capacity_bytes=capacity_bytes, used_bytes=used_bytes)

    def leave(self) -> Member:
        """Mark this node LEFT (graceful shutdown); the record to send to peers."""
        with self._cond:
            me = replace(self._members[self.node_id], state=State.LEFT)
            self._members[self.node_id] = me
            self._bump(0)
            return me

    # ------------------------------------------------------------------ watching

    def wait_changed(self, epoch: int, timeout_s: float) -> int:
        """Block until the epoch differs from ``epoch`` (or timeout, or close); the epoch now."""
        with self._cond:
            self._cond.wait_for(lambda: self._epoch != epoch or self._closed, timeout_s)
            return self._epoch

    def close(self) -> None:
        """Wake every waiter for good (shutdown)."""
        with self._cond:
            self._closed = True
            self._notify()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ change listeners

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever the epoch changes and on close. It runs with the lock
        held, on whichever thread changed the view, so it must only hand the news on (the
        control plane's event loop: ``loop.call_soon_threadsafe``), never call back in here."""
        with self._cond:
            self._listeners.append(listener)

    def _notify(self) -> None:
        self._cond.notify_all()
        for listener in self._listeners:
            listener()

    # ------------------------------------------------------------------ internals (lock held)

    def _bump(self, seen_epoch: int) -> None:
        self._epoch = max(self._epoch, seen_epoch) + 1
        self._notify()

    def _same_view(self, records: list[Member]) -> bool:
        return {m.identity for m in self._members.values()} == {r.identity for r in records}

    def _apply(self, record: Member, *, direct: bool) -> bool:
        if record.node_id == self.node_id:
            return self._about_me(record)
        known = self._members.get(record.node_id)
        if known is None:
            self._members[record.node_id] = record
            # Give a member we learnt of second-hand the full timeout to reach us itself.
            self._last_heard.setdefault(record.node_id, self._clock())
            return True
        if record.supersedes(known):
            self._members[record.node_id] = record
            if record.incarnation > known.incarnation:
                self._last_heard[record.node_id] = self._clock()  # a new life starts a new timer
            return record.identity != known.identity
        if direct and record.identity == known.identity:
            self._members[record.node_id] = record  # fresher usage figures from the source
        return False

    def _about_me(self, record: Member) -> bool:
        me = self._members[self.node_id]
        if me.state is State.LEFT:
            return False  # leaving: nothing to refute
        if record.incarnation > me.incarnation or (
            record.incarnation == me.incarnation and record.state is not State.ALIVE
        ):
            # Refute: only this node may raise its own incarnation, and doing so clears
            # the suspicion (or a stale record of an earlier life) everywhere it spreads.
            incarnation = max(record.incarnation, me.incarnation) + 1
            data_since = me.data_since
            if self._verdict_on_my_data(record, me):
                data_since = incarnation
            self._members[self.node_id] = replace(me, incarnation=incarnation, state=State.ALIVE, data_since=data_since)
            return True
        if self._verdict_on_my_data(record, me):
            # A DEAD verdict on an earlier life whose data this node still holds (it refuted a
            # suspicion since): writers stopped counting it back then, so wipe and say so.
            incarnation = me.incarnation + 1
            self._members[self.node_id] = replace(me, incarnation=incarnation, data_since=incarnation)
            return True
        return False

    def _verdict_on_my_data(self, record: Member, me: Member) -> bool:
        """True (after wiping) if ``record`` declares DEAD a life whose data this node still holds."""
        if record.state is not State.DEAD or record.incarnation < me.data_since:
            return False
        if self.on_declared_dead is not None:
            self.on_declared_dead()  # before the refutation spreads and clients route here again
        return True

    def writable(self) -> bool:
        """True once every peer that is not DEAD or LEFT has shown our current data life.

        Until then a peer may still hold an older record of us and declare *that* life DEAD;
        the verdict would not make us wipe (it names data we no longer hold) and our refutation
        would outrank it, yet its clients would have written without us meanwhile. So writes
        wait: after a start or a wipe, for one heartbeat exchange with each peer.
        """
        with self._cond:
            since = self._members[self.node_id].data_since
            return all(
                self._echo.get(node_id, -1) >= since
                for node_id, m in self._members.items()
                if node_id != self.node_id and m.state in (State.ALIVE, State.SUSPECT)
            )

    def data_restarted(self) -> None:
        """This node dropped its data on its own (a stall): a new incarnation says so, so no
        DEAD verdict on the old data keeps it out of placement, and none makes it wipe again."""
        with self._cond:
            me = self._members[self.node_id]
            if me.state is State.LEFT:
                return
            incarnation = me.incarnation + 1
            self._members[self.node_id] = replace(me, incarnation=incarnation, data_since=incarnation)
            self._bump(0)
