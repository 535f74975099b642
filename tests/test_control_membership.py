"""The membership state machine, driven by a fake clock: no sockets, no sleeping."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lmcache_memkv.control.member import Member, State
from lmcache_memkv.control.membership import Membership

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
    ms.merge(0, [ms.local, member("b")], source="b")
    assert not ms.writable()  # c has not shown us yet
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


def test_silence_makes_suspect_then_dead(ms: Membership, clock: Clock) -> None:
    ms.heard_from(member("b"))
    clock.advance(SUSPECT_AFTER - 0.1)
    assert ms.tick() == []
    clock.advance(0.2)
    assert ms.tick() == [("b", State.SUSPECT)]
    assert ms.tick() == []  # no repeated transition
    clock.advance(DEAD_AFTER - SUSPECT_AFTER)
    assert ms.tick() == [("b", State.DEAD)]
    clock.advance(100)
    assert ms.tick() == []  # DEAD members are not timed any further


def test_heartbeats_keep_a_member_alive(ms: Membership, clock: Clock) -> None:
    ms.heard_from(member("b"))
    for _ in range(20):
        clock.advance(SUSPECT_AFTER * 0.9)
        ms.heard_from(member("b"))
        assert ms.tick() == []
    assert ms.get("b").state is State.ALIVE  # type: ignore[union-attr]


def test_suspect_is_cleared_only_by_a_higher_incarnation(ms: Membership, clock: Clock) -> None:
    ms.heard_from(member("b", 5))
    clock.advance(SUSPECT_AFTER + 0.1)
    ms.tick()
    # b speaks again with the same incarnation: SWIM keeps the suspicion until b refutes it.
    assert not ms.heard_from(member("b", 5))
    assert ms.get("b").state is State.SUSPECT  # type: ignore[union-attr]
    assert ms.heard_from(member("b", 6))
    assert states(ms)["b"] == (6, State.ALIVE)
    clock.advance(SUSPECT_AFTER - 0.1)
    assert ms.tick() == []  # the refutation restarted b's timer


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
    for _ in range(3):  # regular ticks: nothing happens
        clock.advance(0.5)
        assert ms.tick() == []
    clock.advance(30)  # this node was frozen: its peers' silence is its own doing
    assert ms.tick() == []
    assert ms.get("b").state is State.ALIVE  # type: ignore[union-attr]
    for _ in range(int(SUSPECT_AFTER / 0.5) + 1):  # a peer that stays silent is still found out
        clock.advance(0.5)
        changes = ms.tick()
    assert changes == [("b", State.SUSPECT)]


def test_member_learnt_by_gossip_gets_a_full_timeout(ms: Membership, clock: Clock) -> None:
    clock.advance(50)
    ms.merge(0, [member("c")])
    clock.advance(SUSPECT_AFTER - 0.1)
    assert ms.tick() == []
    clock.advance(0.2)
    assert ms.tick() == [("c", State.SUSPECT)]


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
