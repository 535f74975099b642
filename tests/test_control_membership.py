"""The membership state machine, driven by a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from lmcache_memkv.control.member import Member, State
from lmcache_memkv.control.membership import Membership, retransmit_limit
from lmcache_memkv.control.swim import ProbeOrder

SUSPECT_AFTER = 1.5
DEAD_AFTER = 3.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def member(
    node_id: str, incarnation: int = 1, state: State = State.ALIVE, used: int = 0, data_since: int | None = None
) -> Member:
    """A record; by default of a fresh life (its data began at this incarnation)."""
    port = 9000 + sum(node_id.encode())
    return Member(
        node_id=node_id,
        incarnation=incarnation,
        state=state,
        data_endpoint=f"127.0.0.1:{port}",
        control_endpoint=f"127.0.0.1:{port + 1}",
        capacity_bytes=1 << 30,
        used_bytes=used,
        data_since=incarnation if data_since is None else data_since,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ms(clock: Clock) -> Membership:
    return Membership(member("a"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock)


def states(ms: Membership) -> dict[str, tuple[int, State]]:
    return {m.node_id: (m.incarnation, m.state) for m in ms.view()[1]}


def test_precedence_rules() -> None:
    alive1, suspect1, dead1, left1 = (member("x", 1, s) for s in (State.ALIVE, State.SUSPECT, State.DEAD, State.LEFT))
    alive2 = member("x", 2)
    assert suspect1.supersedes(alive1) and dead1.supersedes(suspect1) and left1.supersedes(dead1)
    assert not alive1.supersedes(suspect1) and not alive1.supersedes(alive1)
    assert alive2.supersedes(left1) and alive2.supersedes(dead1)
    assert not dead1.supersedes(alive2)
    assert [State.from_rank(s.rank) for s in State] == list(State)


def test_a_dead_verdict_outranks_later_lives_that_kept_their_data() -> None:
    """A node that refuted a suspicion kept its data; if another member declared that earlier
    life DEAD, writers stopped counting it, so the verdict wins until the node wipes."""
    dead5 = member("x", 5, State.DEAD)
    refuted6 = member("x", 6, data_since=3)  # refuted a suspicion: data from incarnation 3 on
    wiped7 = member("x", 7, data_since=7)
    assert dead5.supersedes(refuted6) and not refuted6.supersedes(dead5)
    assert wiped7.supersedes(dead5) and not dead5.supersedes(wiped7)
    assert member("x", 6, data_since=6).supersedes(dead5)  # a restart: fresh data


def test_a_node_wipes_on_a_dead_verdict_on_any_life_it_still_holds_data_from(clock: Clock) -> None:
    wipes: list[str] = []
    ms = Membership(member("a", 3), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock)
    ms.on_declared_dead = lambda: wipes.append("wipe")
    ms.merge(0, [member("a", 3, State.SUSPECT)])  # a suspicion: refuted, data kept
    assert (ms.local.incarnation, ms.local.data_since, wipes) == (4, 3, [])
    ms.merge(0, [member("a", 3, State.DEAD)])  # an earlier life declared DEAD: its data is still here
    assert wipes == ["wipe"] and ms.local.incarnation == 5 and ms.local.data_since == 5
    ms.merge(0, [member("a", 3, State.DEAD)])  # the same verdict again: already wiped since
    assert wipes == ["wipe"]
    ms.data_restarted()  # a stall wipe announces itself the same way
    assert ms.local.incarnation == ms.local.data_since == 6


def test_a_peer_keeps_a_dead_member_dead_until_it_wipes(ms: Membership) -> None:
    ms.heard_from(member("b", 3))
    ms.merge(0, [member("b", 3, State.DEAD)])
    ms.heard_from(member("b", 4, data_since=3))  # its refutation of a suspicion, data kept
    assert ms.get("b").state is State.DEAD  # type: ignore[union-attr]
    ms.heard_from(member("b", 5, data_since=5))  # wiped: back in
    assert ms.get("b").state is State.ALIVE  # type: ignore[union-attr]


def test_writes_wait_until_every_live_peer_has_seen_the_current_data_life(ms: Membership) -> None:
    """A peer holding an older record of us could declare that life DEAD without making us wipe;
    so after a start or a wipe, writes wait until each live peer's view shows our current life."""
    assert ms.writable()  # alone: nobody to wait for
    ms.heard_from(member("b"))
    ms.heard_from(member("c"))
    assert not ms.writable()
    assert [m.node_id for m in ms.unechoed()] == ["b", "c"]  # whom to ping for their echo
    ms.merge(0, [ms.local, member("b")], source="b")
    assert not ms.writable()  # c has not shown us yet
    assert [m.node_id for m in ms.unechoed()] == ["c"]
    ms.merge(0, [replace(ms.local, incarnation=0, data_since=0), member("c")], source="c")
    assert not ms.writable()  # c shows an older life of ours
    ms.merge(0, [ms.local, member("c")], source="c")
    assert ms.writable()
    ms.data_restarted()  # a wipe: a new data life nobody has seen
    assert not ms.writable()
    for peer in ("b", "c"):
        ms.merge(0, [ms.local, member(peer)], source=peer)
    assert ms.writable()
    ms.merge(0, [member("c", 1, State.DEAD)])  # a dead peer is not waited for
    ms.heard_from(member("d"))
    assert not ms.writable()


def test_join_adds_member_and_bumps_epoch(ms: Membership) -> None:
    e0 = ms.epoch
    assert ms.heard_from(member("b"))
    assert ms.epoch == e0 + 1
    assert states(ms) == {"a": (1, State.ALIVE), "b": (1, State.ALIVE)}
    # The same record again changes nothing, and fresher usage figures do not move the epoch.
    assert not ms.heard_from(member("b", used=123))
    assert ms.epoch == e0 + 1
    assert ms.get("b") is not None and ms.get("b").used_bytes == 123  # type: ignore[union-attr]


def test_a_failed_probe_makes_suspect_then_dead_unless_refuted(ms: Membership, clock: Clock) -> None:
    ms.heard_from(member("b"))
    clock.advance(100)
    assert ms.tick() == []  # silence alone accuses nobody: only a failed probe does
    assert ms.suspect("b") and not ms.suspect("b")  # no repeated transition
    assert ms.get("b").state is State.SUSPECT  # type: ignore[union-attr]
    clock.advance(DEAD_AFTER - SUSPECT_AFTER - 0.1)
    assert ms.tick() == []
    clock.advance(0.2)
    assert ms.tick() == [("b", State.DEAD)]
    assert ms.tick() == []
    assert not ms.suspect("b")  # DEAD is not suspected again
    ms.heard_from(member("b", 9, data_since=9))
    assert not ms.suspect("b", incarnation=1)  # a probe of an earlier life accuses nobody
    assert ms.suspect("b", incarnation=9)


def test_suspect_is_cleared_only_by_a_higher_incarnation(ms: Membership, clock: Clock) -> None:
    ms.heard_from(member("b", 5))
    ms.suspect("b")
    # b speaks again with the same incarnation: SWIM keeps the suspicion until b refutes it.
    assert not ms.heard_from(member("b", 5))
    assert ms.get("b").state is State.SUSPECT  # type: ignore[union-attr]
    assert ms.heard_from(member("b", 6))
    assert states(ms)["b"] == (6, State.ALIVE)
    clock.advance(DEAD_AFTER)
    assert ms.tick() == []  # the refutation ended the suspicion timer


def test_a_suspicion_learnt_by_gossip_starts_its_own_timer(ms: Membership, clock: Clock) -> None:
    ms.heard_from(member("b", 5))
    clock.advance(50)
    ms.absorb([member("b", 5, State.SUSPECT)], source=None)
    clock.advance(DEAD_AFTER - SUSPECT_AFTER - 0.1)
    assert ms.tick() == []
    clock.advance(0.2)
    assert ms.tick() == [("b", State.DEAD)]


def test_node_refutes_suspicion_about_itself(ms: Membership) -> None:
    inc = ms.local.incarnation
    e0 = ms.epoch
    assert ms.merge(7, [replace(ms.local, state=State.SUSPECT)])
    assert ms.local.incarnation == inc + 1 and ms.local.state is State.ALIVE
    assert ms.epoch == max(e0, 7) + 1
    # Gossip about an earlier life with a higher incarnation (clock skew) is out-ranked too.
    ms.merge(0, [replace(ms.local, incarnation=inc + 10, state=State.DEAD)])
    assert ms.local.incarnation == inc + 11 and ms.local.state is State.ALIVE
    # Stale news (a lower incarnation) is ignored.
    assert not ms.merge(0, [replace(ms.local, incarnation=inc, state=State.DEAD, data_since=inc)])


def test_restart_with_higher_incarnation_revives_dead_or_left(ms: Membership, clock: Clock) -> None:
    ms.heard_from(member("b", 10))
    ms.heard_from(member("b", 10, State.LEFT))
    assert states(ms)["b"] == (10, State.LEFT)
    assert not ms.merge(0, [member("b", 10)])  # a late ALIVE of the same life cannot undo LEFT
    clock.advance(100)
    assert ms.tick() == []  # LEFT is final for that incarnation: no timing
    assert ms.heard_from(member("b", 11))
    assert states(ms)["b"] == (11, State.ALIVE)


def test_gossip_merges_third_parties_and_epochs_converge(clock: Clock) -> None:
    a = Membership(member("a"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock)
    b = Membership(member("b"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock)
    c = Membership(member("c"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock)
    # b and c join through a; b then learns of c by gossip from a.
    a.heard_from(b.local)
    b.merge(*a.view())
    a.heard_from(c.local)
    c.merge(*a.view())
    b.merge(*a.view())
    for _ in range(2):  # a round of gossip each way settles the epochs too
        for x in (a, b, c):
            for y in (a, b, c):
                if x is not y:
                    y.merge(*x.view())
    views = [{m.identity for m in x.view()[1]} for x in (a, b, c)]
    assert views[0] == views[1] == views[2] and len(views[0]) == 3
    assert a.epoch == b.epoch == c.epoch


def test_dead_state_spreads_by_gossip_and_precedence(clock: Clock) -> None:
    a = Membership(member("a"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock)
    b = Membership(member("b"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock)
    for x in (a, b):
        x.heard_from(member("z", 3))
    a.suspect("z")
    clock.advance(DEAD_AFTER + 0.1)
    b.heard_from(a.local)
    assert ("z", State.DEAD) in a.tick()
    b.merge(*a.view())
    assert b.get("z").state is State.DEAD  # type: ignore[union-attr]
    # LEFT outranks DEAD at the same incarnation, so a goodbye seen late still wins.
    b.merge(0, [member("z", 3, State.LEFT)])
    a.merge(*b.view())
    assert a.get("z").state is State.LEFT  # type: ignore[union-attr]


def test_a_stalled_node_restarts_timers_instead_of_accusing_peers(clock: Clock) -> None:
    ms = Membership(member("a"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock, stall_after_s=1.0)
    ms.heard_from(member("b"))
    ms.suspect("b")
    for _ in range(2):  # regular ticks: nothing happens yet
        clock.advance(0.5)
        assert ms.tick() == []
    clock.advance(30)  # this node was frozen: the time its suspicion ran is its own doing
    assert ms.tick() == []
    assert ms.get("b").state is State.SUSPECT  # type: ignore[union-attr]
    changes: list[tuple[str, State | None]] = []
    for _ in range(int((DEAD_AFTER - SUSPECT_AFTER) / 0.5) + 1):  # a suspicion never refuted still ends DEAD
        clock.advance(0.5)
        changes += ms.tick()
    assert changes == [("b", State.DEAD)]


def test_dead_and_left_members_are_reaped_and_stale_gossip_cannot_bring_them_back(clock: Clock) -> None:
    ms = Membership(member("a"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock, reap_after_s=10)
    ms.heard_from(member("b", 5))
    ms.heard_from(member("c", 7))
    ms.merge(0, [member("b", 5, State.DEAD), member("c", 7, State.LEFT)])
    clock.advance(9)
    assert ms.tick() == []
    clock.advance(1.1)
    assert sorted(ms.tick(), key=str) == [("b", None), ("c", None)]
    assert set(states(ms)) == {"a"}
    # Gossip still carrying those lives (an earlier ALIVE, the verdicts themselves) is refused.
    for stale in (member("b", 5), member("b", 5, State.SUSPECT), member("b", 5, State.DEAD), member("c", 7)):
        assert not ms.absorb([stale], source=None)
    assert not ms.merge(0, [member("b", 4), member("c", 7, State.LEFT)])
    assert set(states(ms)) == {"a"}
    # A new life (a restart: higher incarnation, fresh data) rejoins.
    assert ms.heard_from(member("c", 8))
    assert states(ms)["c"] == (8, State.ALIVE)


def test_a_reaped_life_that_speaks_itself_gets_its_verdict_back(clock: Clock) -> None:
    """A node declared DEAD and reaped while partitioned comes back with the same life and its
    old data: the verdict is restored (so the Join answer carries it and the node wipes)."""
    ms = Membership(member("a"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock, reap_after_s=10)
    ms.heard_from(member("b", 5))
    ms.suspect("b")
    clock.advance(DEAD_AFTER)
    ms.tick()
    clock.advance(11)
    assert ms.tick() == [("b", None)]
    assert ms.heard_from(member("b", 6, data_since=5))  # it refuted a suspicion meanwhile, data kept
    assert states(ms)["b"] == (5, State.DEAD)
    assert ms.heard_from(member("b", 7, data_since=7))  # it wiped: back in
    assert states(ms)["b"] == (7, State.ALIVE)


def test_reaped_records_are_forgotten_after_a_bounded_time(clock: Clock) -> None:
    ms = Membership(member("a"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock, reap_after_s=10)
    ms.heard_from(member("b", 5, State.LEFT))
    clock.advance(10.1)
    ms.tick()
    assert not ms.absorb([member("b", 5)], source=None)
    clock.advance(10 + DEAD_AFTER + 4 * SUSPECT_AFTER + 1)  # past reap_after plus a detection bound (two members)
    ms.tick()
    assert ms.absorb([member("b", 5)], source=None)  # nothing remembered any more


def test_changes_are_piggybacked_a_bounded_number_of_times(ms: Membership) -> None:
    for name in "bcdefgh":
        ms.heard_from(member(name))
    limit = retransmit_limit(len(ms.view()[1]))
    sent: dict[str, int] = {}
    for _ in range(100):
        batch = ms.piggyback(3)
        assert len(batch) <= 3
        for r in batch:
            sent[r.node_id] = sent.get(r.node_id, 0) + 1
    assert set(sent) == set("bcdefgh") and max(sent.values()) <= limit
    assert ms.piggyback(3) == [] and ms.pending_gossip() == 0
    ms.suspect("b")  # a new change goes out again
    assert [r.node_id for r in ms.piggyback(3)] == ["b"]


def test_gossip_about_us_from_a_peer_is_its_echo(ms: Membership) -> None:
    ms.heard_from(member("b"))
    assert not ms.writable()
    ms.absorb([member("b"), replace(ms.local, incarnation=0, data_since=0)], source="b")
    assert not ms.writable()  # an earlier life of ours
    ms.absorb([ms.local], source="b")
    assert ms.writable()


def test_equal_views_settle_on_equal_epochs_through_digests(clock: Clock) -> None:
    a = Membership(member("a"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock)
    b = Membership(member("b"), suspect_after_s=SUSPECT_AFTER, dead_after_s=DEAD_AFTER, clock=clock)
    a.heard_from(b.local)
    b.heard_from(a.local)
    gone = [member(f"x{i}", 1, State.LEFT) for i in range(5)]
    for record in gone:
        a.heard_from(record)  # a's epoch runs ahead: one change at a time
    b.merge(0, gone)
    assert a.digest()[1] == b.digest()[1] and a.epoch != b.epoch
    b.absorb([], source="a", epoch=a.epoch, digest=a.digest()[1])
    assert a.epoch == b.epoch
    b.absorb([], source="a", epoch=a.epoch + 5, digest=a.digest()[1] ^ 1)  # another view: epoch kept
    assert a.epoch == b.epoch


def test_probe_order_visits_each_member_once_per_pass_in_a_new_order() -> None:
    order = ProbeOrder(random.Random(7))
    members = [f"n{i}" for i in range(8)]
    passes = [[order.next(members) for _ in members] for _ in range(4)]
    assert all(sorted(p) == members for p in passes)  # type: ignore[type-var]
    assert len({tuple(p) for p in passes}) > 1
    # A member learnt mid-pass is probed within the same pass; a gone one is skipped.
    order = ProbeOrder(random.Random(7))
    first = [order.next(members) for _ in range(3)]
    rest = [order.next([*members, "new"][1:]) for _ in range(6)]
    assert "new" in rest and "n0" not in rest and sorted(first + rest) == sorted(set(first + rest))


def test_leave_marks_self_left_and_ignores_later_suspicion(ms: Membership) -> None:
    e0 = ms.epoch
    me = ms.leave()
    assert me.state is State.LEFT and ms.epoch == e0 + 1
    assert not ms.merge(0, [replace(me, state=State.DEAD)])
    assert ms.local.state is State.LEFT


def test_wait_changed_wakes_on_change_and_close(ms: Membership) -> None:
    e0 = ms.epoch
    assert ms.wait_changed(e0, 0.01) == e0  # times out
    ms.heard_from(member("b"))
    assert ms.wait_changed(e0, 1.0) == e0 + 1
    ms.close()
    assert ms.wait_changed(ms.epoch, 5.0) == ms.epoch  # returns at once when closed
    assert ms.closed


def test_rejects_inconsistent_timeouts(clock: Clock) -> None:
    with pytest.raises(ValueError, match="suspect_after_s < dead_after_s"):
        Membership(member("a"), suspect_after_s=3, dead_after_s=2, clock=clock)
