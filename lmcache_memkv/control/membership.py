"""One node's view of the cluster: members, their states, the epoch, merge, suspicion and reaping.

Pure state (no sockets, an injected clock), so every rule is unit-testable. The probing that
feeds it lives in ``swim``:

- A record the member sent about itself (join, ping, ack, leave) is *direct* evidence. Other
  records (gossip, a full view) only merge. Records merge by SWIM precedence
  (``Member.supersedes``). Gossip that says this node is SUSPECT or DEAD, or knows a higher
  incarnation of it, is refuted by bumping the local incarnation past it.
- A member becomes SUSPECT when a probe of it fails (``suspect``) or when gossip says so; a
  suspicion not refuted (a higher incarnation) within ``dead_after_s - suspect_after_s`` turns
  it DEAD (``tick``). If this node itself stalled (ticks further apart than ``stall_after_s``),
  the time it measured is its own, so it restarts every suspicion timer instead.
- DEAD and LEFT records are reaped ``reap_after_s`` after this node learnt them, so views and
  probing stop growing. A reaped record is remembered a while longer: gossip not newer than it
  cannot bring the member back, and the member's own record of that life (a Join after a
  partition) reinstates the verdict, so the node learns it and wipes.
- Every change of a member's record is queued for dissemination: ``piggyback`` hands out the
  freshest few, each about ``RETRANSMIT_MULT * log2(N + 1)`` times in all.
- The epoch grows on every change of membership (not of usage figures). Epochs travel with
  gossip like a Lamport clock, and a digest of the membership rides along, so nodes with equal
  views settle on equal epochs without exchanging whole views.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace

from lmcache_memkv.control.convert import MAX_MEMBERS, check_epoch, check_member
from lmcache_memkv.control.member import Member, State

RETRANSMIT_MULT = 3  # lambda: each change is sent about lambda * log2(N + 1) times
_DOWN = (State.DEAD, State.LEFT)


def retransmit_limit(members: int) -> int:
    return RETRANSMIT_MULT * max(1, math.ceil(math.log2(members + 1)))


class Membership:
    def __init__(
        self,
        local: Member,
        *,
        suspect_after_s: float,
        dead_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        stall_after_s: float | None = None,
        reap_after_s: float = 300.0,
        cluster_id: str = "memkv",
    ) -> None:
        if not 0 < suspect_after_s < dead_after_s:
            raise ValueError(f"need 0 < suspect_after_s < dead_after_s, got {suspect_after_s}, {dead_after_s}")
        if reap_after_s <= 0:
            raise ValueError(f"need reap_after_s > 0, got {reap_after_s}")
        self.node_id = local.node_id
        self.cluster_id = cluster_id
        self.suspect_after_s = suspect_after_s
        self.dead_after_s = dead_after_s
        self.suspicion_s = dead_after_s - suspect_after_s  # an unrefuted suspicion turns DEAD after this
        self.reap_after_s = reap_after_s
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._last_tick: float | None = None
        self._cond = threading.Condition()
        self._members: dict[str, Member] = {local.node_id: replace(local, state=State.ALIVE)}
        self._last_heard: dict[str, float] = {}
        self._suspected_at: dict[str, float] = {}  # SUSPECT members: when this node began to suspect
        self._down_at: dict[str, float] = {}  # DEAD and LEFT members: when this node learnt it
        # Reaped members: the last record and when to forget it, oldest first, at most MAX_MEMBERS.
        self._reaped: OrderedDict[str, tuple[Member, float]] = OrderedDict()
        self._queue: dict[str, int] = {}  # node id -> transmissions of its record still to make
        self._epoch = 1
        self._digest: tuple[int, int] | None = None  # (epoch, digest) cache
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

    def digest(self) -> tuple[int, int]:
        """(epoch, a 64-bit digest of the membership): equal digests mean equal views."""
        with self._cond:
            if self._digest is None or self._digest[0] != self._epoch:
                h = hashlib.blake2b(digest_size=8)
                for k in sorted(self._members):
                    h.update(repr(self._members[k].identity).encode())
                self._digest = (self._epoch, int.from_bytes(h.digest(), "big"))
            return self._digest

    # ------------------------------------------------------------------ updates

    def heard_from(self, record: Member) -> bool:
        """Merge a record a member sent about itself; True if the view changed.
        ValueError (nothing changed) if an integer in it is out of range (see ``convert``)."""
        check_member(record)
        with self._cond:
            if record.node_id != self.node_id:
                self._last_heard[record.node_id] = self._clock()
            changed = self._apply(record, direct=True, spread=True)
            if changed:
                self._bump(0)
            return changed

    def merge(
        self, epoch: int, records: Iterable[Member], source: str | None = None, *, spread: bool = True
    ) -> bool:
        """Merge another node's whole view (a join's answer, anti-entropy); True if this view
        changed. ``source``: the member whose own view this is (it then has our record as it
        shows; see ``writable``). ``spread``: queue what was new here for gossip.
        ValueError (nothing changed) if an integer in it is out of range (see ``convert``)."""
        records = [check_member(r) for r in records]
        check_epoch(epoch)
        with self._cond:
            self._note_echo(source, records)
            changed = False
            for record in records:
                changed |= self._apply(record, direct=False, spread=spread)
            if changed:
                self._bump(epoch)
            elif epoch > self._epoch and self._same_view(records):
                self._epoch = epoch  # equal views, equal epochs: lets epochs converge
                self._notify()
            return changed

    def absorb(
        self, records: Iterable[Member], source: str | None = None, epoch: int = 0, digest: int | None = None
    ) -> bool:
        """Merge piggybacked gossip from ``source`` (its current records, so those about us are
        its echo of our life); ``epoch``/``digest``: the sender's, to settle equal views on
        equal epochs. True if this view changed. ValueError (nothing changed) as ``merge``."""
        records = [check_member(r) for r in records]
        check_epoch(epoch)
        with self._cond:
            self._note_echo(source, records)
            changed = False
            for record in records:
                changed |= self._apply(record, direct=False, spread=True)
            if changed:
                self._bump(epoch)
            elif epoch > self._epoch and digest is not None and digest == self.digest()[1]:
                self._epoch = epoch
                self._notify()
            return changed

    def suspect(self, node_id: str, incarnation: int | None = None) -> bool:
        """A probe of ``node_id`` (of that ``incarnation``, if given) got no ack, direct or
        indirect: ALIVE -> SUSPECT; True if so. A life that began since the probe is not accused."""
        with self._cond:
            m = self._members.get(node_id)
            if node_id == self.node_id or m is None or m.state is not State.ALIVE:
                return False
            if incarnation is not None and m.incarnation != incarnation:
                return False
            self._set(replace(m, state=State.SUSPECT), spread=True)
            self._bump(0)
            return True

    def tick(self) -> list[tuple[str, State | None]]:
        """Apply suspicion timeouts and reaping at the clock's current time; the transitions
        made (``None``: reaped, gone from the view)."""
        now = self._clock()
        changes: list[tuple[str, State | None]] = []
        with self._cond:
            stalled = (
                self.stall_after_s is not None
                and self._last_tick is not None
                and now - self._last_tick > self.stall_after_s
            )
            self._last_tick = now
            if stalled:
                for node_id in self._suspected_at:
                    self._suspected_at[node_id] = now
                return []
            for node_id, since in list(self._suspected_at.items()):
                if now - since > self.suspicion_s:
                    self._set(replace(self._members[node_id], state=State.DEAD), spread=True)
                    changes.append((node_id, State.DEAD))
            for node_id, since in list(self._down_at.items()):
                if now - since > self.reap_after_s:
                    self._reap(node_id, now)
                    changes.append((node_id, None))
            while self._reaped and next(iter(self._reaped.values()))[1] <= now:
                self._reaped.popitem(last=False)
            if changes:
                self._bump(0)
        return changes

    def piggyback(self, limit: int) -> list[Member]:
        """Up to ``limit`` recently changed records to send with a message, least sent first."""
        with self._cond:
            picked = sorted(self._queue, key=lambda k: -self._queue[k])[:limit]
            out = []
            for node_id in picked:
                self._queue[node_id] -= 1
                if self._queue[node_id] <= 0:
                    del self._queue[node_id]
                out.append(self._members[node_id])
            return out

    def pending_gossip(self) -> int:
        with self._cond:
            return len(self._queue)

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

    def _note_echo(self, source: str | None, records: list[Member]) -> None:
        if source is None or source == self.node_id or source not in self._members:
            return
        mine = next((r for r in records if r.node_id == self.node_id), None)
        if mine is not None and mine.incarnation > self._echo.get(source, -1):
            self._echo[source] = mine.incarnation

    def _set(self, record: Member, *, spread: bool) -> None:
        """Store a peer's record; keep its timers and the gossip queue in step with its state."""
        node_id = record.node_id
        known = self._members.get(node_id)
        self._members[node_id] = record
        now = self._clock()
        if record.state is State.SUSPECT:
            if known is None or known.state is not State.SUSPECT or known.incarnation != record.incarnation:
                self._suspected_at[node_id] = now
        else:
            self._suspected_at.pop(node_id, None)
        if record.state in _DOWN:
            if known is None or known.state not in _DOWN:
                self._down_at[node_id] = now
        else:
            self._down_at.pop(node_id, None)
        if spread:
            self._queue[node_id] = retransmit_limit(len(self._members))

    def _reap(self, node_id: str, now: float) -> None:
        record = self._members.pop(node_id)
        for timers in (self._down_at, self._suspected_at, self._last_heard, self._echo, self._queue):
            timers.pop(node_id, None)
        # Remember it until every copy still held elsewhere is reaped too: those nodes learnt
        # the verdict at most one detection bound later, and reap as long after that.
        n = len(self._members) + 1
        forget = now + self.reap_after_s + self.dead_after_s + 2 * n * self.suspect_after_s
        self._reaped.pop(node_id, None)
        self._reaped[node_id] = (record, forget)
        while len(self._reaped) > MAX_MEMBERS:
            self._reaped.popitem(last=False)

    def _apply(self, record: Member, *, direct: bool, spread: bool) -> bool:
        if record.node_id == self.node_id:
            return self._about_me(record)
        known = self._members.get(record.node_id)
        if known is None:
            reaped = self._reaped.get(record.node_id)
            if reaped is not None and not record.supersedes(reaped[0]):
                if not direct:
                    return False  # stale gossip of a reaped life: it stays gone
                # The reaped life speaks itself (back from a partition): restore the verdict,
                # so the answer tells it and it wipes before it is placed again.
                del self._reaped[record.node_id]
                self._set(reaped[0], spread=True)
                return True
            self._reaped.pop(record.node_id, None)
            if len(self._members) >= MAX_MEMBERS:
                return False  # a view is bounded; a new member waits for a reap
            self._set(record, spread=spread)
            return True
        if record.supersedes(known):
            self._set(record, spread=spread and record.identity != known.identity)
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
            self._queue[self.node_id] = retransmit_limit(len(self._members))
            return True
        if self._verdict_on_my_data(record, me):
            # A DEAD verdict on an earlier life whose data this node still holds (it refuted a
            # suspicion since): writers stopped counting it back then, so wipe and say so.
            incarnation = me.incarnation + 1
            self._members[self.node_id] = replace(me, incarnation=incarnation, data_since=incarnation)
            self._queue[self.node_id] = retransmit_limit(len(self._members))
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
        wait: after a start or a wipe, until each peer has echoed our current life (in an ack,
        in a ping it sent us, or in its gossip).
        """
        with self._cond:
            since = self._members[self.node_id].data_since
            return all(
                self._echo.get(node_id, -1) >= since
                for node_id, m in self._members.items()
                if node_id != self.node_id and m.state in (State.ALIVE, State.SUSPECT)
            )

    def unechoed(self) -> list[Member]:
        """The ALIVE and SUSPECT peers that have not yet shown our current data life (``writable``
        waits for them)."""
        with self._cond:
            since = self._members[self.node_id].data_since
            return [
                m
                for k, m in sorted(self._members.items())
                if k != self.node_id and m.state in (State.ALIVE, State.SUSPECT) and self._echo.get(k, -1) < since
            ]

    def data_restarted(self) -> None:
        """This node dropped its data on its own (a stall): a new incarnation says so, so no
        DEAD verdict on the old data keeps it out of placement, and none makes it wipe again."""
        with self._cond:
            me = self._members[self.node_id]
            if me.state is State.LEFT:
                return
            incarnation = me.incarnation + 1
            self._members[self.node_id] = replace(me, incarnation=incarnation, data_since=incarnation)
            self._queue[self.node_id] = retransmit_limit(len(self._members))
            self._bump(0)
