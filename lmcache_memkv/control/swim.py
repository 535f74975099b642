"""SWIM failure detection and gossip dissemination (Das, Gupta and Motivala, 2002).

Each protocol period (``--heartbeat-interval``, T) the node probes ONE member, taken
round-robin from a list of its ALIVE and SUSPECT peers that is shuffled again for every pass
(a member learnt mid-pass goes in at a random place of what is left of the pass):

1. a direct ``Ping``, answered within ``min(T, suspect_after / 2)``;
2. else ``PingReq`` to k random other ALIVE members (``--indirect-probes``); each pings the
   target on our behalf and relays its ack;
3. no ack either way by ``--suspect-after`` after the probe began: the target is SUSPECT
   (checked at the next period, so within ``suspect_after + T``). ``Membership.tick`` turns an
   unrefuted suspicion DEAD ``dead_after - suspect_after`` later.

So every live member probes a given peer at least once every 2(N-1) - 1 periods (the peer
last in one pass and first in the next is the best case, first then last the worst), and a
killed node is DEAD in every view within ``(2N - 1) * T + dead_after`` even if no gossip
reached anyone; gossip usually makes it much sooner (see docs/design.md).

Every Ping, PingReq and ack carries at most ``MAX_PIGGYBACK`` recently changed member records
(``Membership.piggyback``), and the ack carries the prober's record as the target holds it, so
a direct or an indirect probe echoes the prober's current life (the write gate). Per node and
period that is a constant number of messages of bounded size, whatever N. A full-view
exchange (anti-entropy, the ``Heartbeat`` RPC) with one random member every
``ANTI_ENTROPY_PERIODS_PER_MEMBER * N`` periods repairs what gossip missed (usage figures too);
its bytes grow with N and its interval too, so per-node bytes stay flat.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from lmcache_memkv.control.channel import describe_rpc_error
from lmcache_memkv.control.convert import member_from_proto, member_to_proto, view_from_proto, view_to_proto
from lmcache_memkv.control.member import Member, State
from lmcache_memkv.control.membership import Membership
from lmcache_memkv.control.peers import LogThrottle, Peers
from lmcache_memkv.control.response_auth import HEARTBEAT, PING, PING_REQ, fresh_nonce
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, member_pb2

log = logging.getLogger("memkv.control")

MAX_PIGGYBACK = 6  # member records gossiped per message
MAX_GOSSIP_IN = 64  # more than this in one message is refused (INVALID_ARGUMENT)
MAX_ECHO_PINGS = 8  # extra pings per period to peers that have not echoed our current life
ANTI_ENTROPY_PERIODS_PER_MEMBER = 4
ANTI_ENTROPY_MIN_PERIODS = 10
Count = Callable[[str, int], None]  # (direction "sent" or "received", bytes)
Outcome = Callable[[str], None]  # a probe's outcome: "direct", "indirect" or "none"
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)


def dead_bound_s(members: int, interval_s: float, dead_after_s: float) -> float:
    """The most seconds after a member dies until every live member holds it DEAD (no gossip
    needed): its next probe by each member, the probe's and the suspicion's timeouts, and one
    period of tick granularity."""
    return (2 * max(members - 1, 1) + 1) * interval_s + dead_after_s


class ProbeOrder:
    """Round-robin over a shuffled list of members, shuffled again for every pass."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._pending: list[str] = []
        self._in_pass: set[str] = set()

    def next(self, members: Sequence[str]) -> str | None:
        live = set(members)
        for node_id in sorted(live - self._in_pass):  # learnt mid-pass: somewhere in the rest of it
            self._pending.insert(self._rng.randint(0, len(self._pending)), node_id)
            self._in_pass.add(node_id)
        while self._pending:
            node_id = self._pending.pop()
            if node_id in live:
                return node_id
        if not live:
            self._in_pass = set()
            return None
        self._pending = sorted(live)
        self._rng.shuffle(self._pending)
        self._in_pass = set(live)
        return self._pending.pop()


@dataclass
class _Probe:
    target: Member
    started: float
    acked: bool = False
    via: str = "none"
    lock: threading.Lock = field(default_factory=threading.Lock)


class Swim:
    def __init__(
        self,
        membership: Membership,
        peers: Peers,
        *,
        interval_s: float,
        probe_timeout_s: float,
        indirect_probes: int,
        count: Count = lambda direction, n: None,
        outcome: Outcome = lambda result: None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._m = membership
        self._peers = peers
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s  # --suspect-after
        self.direct_timeout_s = min(interval_s, probe_timeout_s / 2)
        self.indirect_probes = indirect_probes
        self._count = count
        self._outcome = outcome
        self._rng = rng or random.Random()
        self._clock = clock
        self._order = ProbeOrder(self._rng)
        self._probes: list[_Probe] = []
        self._echo_pending: set[str] = set()  # peers with an echo ping in flight
        self._lock = threading.Lock()
        self._rounds = 0
        self._logged = LogThrottle()

    # ------------------------------------------------------------------ the protocol period

    def round(self) -> None:
        """One protocol period: settle the probes that ran out, probe the next member, and now
        and then run an anti-entropy exchange."""
        self._rounds += 1
        self._settle_probes()
        live = [m for m in self._m.peers() if m.state in (State.ALIVE, State.SUSPECT)]
        target_id = self._order.next([m.node_id for m in live])
        target = next((m for m in live if m.node_id == target_id), None)
        if target is not None:
            self._probe(target)
        self._echo_pings(exclude=target_id)
        every = max(ANTI_ENTROPY_MIN_PERIODS, ANTI_ENTROPY_PERIODS_PER_MEMBER * (len(live) + 1))
        alive = [m for m in live if m.state is State.ALIVE]
        if alive and self._rounds % every == 0:
            self._anti_entropy(self._rng.choice(alive))

    def _settle_probes(self) -> None:
        now = self._clock()
        with self._lock:
            due = [p for p in self._probes if p.acked or now - p.started > self.probe_timeout_s]
            self._probes = [p for p in self._probes if p not in due]
        for p in due:
            if p.acked:
                self._outcome(p.via)
                continue
            if now - p.started > 2 * self.probe_timeout_s + self.interval_s:
                continue  # this node was stalled past the deadline: the silence may be its own
            self._outcome("none")
            if self._m.suspect(p.target.node_id, p.target.incarnation):
                log.warning(
                    "member %s is now SUSPECT: no ack to a direct or %d indirect probes within %.2fs",
                    p.target.node_id,
                    self.indirect_probes,
                    self.probe_timeout_s,
                )

    # ------------------------------------------------------------------ probing

    def ping_request(self, target: Member, origin: str = "") -> cluster_pb2.PingRequest:
        epoch, digest = self._m.digest()
        return cluster_pb2.PingRequest(
            member=member_to_proto(self._m.local),
            target=member_to_proto(target),
            gossip=[member_to_proto(r) for r in self._m.piggyback(MAX_PIGGYBACK)],
            origin=origin,
            nonce=fresh_nonce(),
            cluster_id=self._m.cluster_id,
            epoch=epoch,
            view_digest=digest,
        )

    def _probe(self, target: Member) -> None:
        probe = _Probe(target, self._clock())
        with self._lock:
            self._probes.append(probe)
        request = self.ping_request(target)
        self._count("sent", request.ByteSize())
        future = self._peers.ping(target.control_endpoint, request, self.direct_timeout_s)
        future.add_done_callback(lambda f: self._on_ping(probe, request, f))

    def _on_ping(self, probe: _Probe, request: cluster_pb2.PingRequest, future: grpc.Future) -> None:
        if future.cancelled():
            return
        reply = self._checked(PING, probe.target.control_endpoint, request, future)
        if reply is not None and self._take_ack(probe.target, reply, reply.member, _field(reply, "seen")):
            self._acked(probe, "direct")
            return
        self._indirect(probe)

    def _indirect(self, probe: _Probe) -> None:
        remaining = probe.started + self.probe_timeout_s - self._clock()
        if remaining <= 0 or self.indirect_probes == 0:
            return
        helpers = [
            m for m in self._m.peers() if m.state is State.ALIVE and m.node_id != probe.target.node_id
        ]
        for helper in self._rng.sample(helpers, min(self.indirect_probes, len(helpers))):
            request = cluster_pb2.PingReqRequest(
                member=member_to_proto(self._m.local),
                target=member_to_proto(probe.target),
                gossip=[member_to_proto(r) for r in self._m.piggyback(MAX_PIGGYBACK)],
                nonce=fresh_nonce(),
                cluster_id=self._m.cluster_id,
                timeout_ms=max(1, int(remaining * 1000 * 0.8)),  # the rest: the helper's answer to us
            )
            self._count("sent", request.ByteSize())
            future = self._peers.ping_req(helper.control_endpoint, request, remaining)
            future.add_done_callback(lambda f, h=helper, r=request: self._on_ping_req(probe, h, r, f))

    def _on_ping_req(
        self, probe: _Probe, helper: Member, request: cluster_pb2.PingReqRequest, future: grpc.Future
    ) -> None:
        if future.cancelled():
            return
        reply = self._checked(PING_REQ, helper.control_endpoint, request, future)
        if reply is None:
            return
        try:
            self._m.heard_from(member_from_proto(reply.member))
            self._m.absorb([member_from_proto(r) for r in reply.gossip[:MAX_GOSSIP_IN]], source=helper.node_id)
        except ValueError as exc:
            self._warn(helper.control_endpoint, f"ignoring the PingReq answer of {helper.node_id}: {exc}")
            return
        if reply.acked and reply.HasField("target") and self._take_ack(probe.target, None, reply.target, _field(reply, "seen")):
            self._acked(probe, "indirect")

    def _acked(self, probe: _Probe, via: str) -> None:
        with probe.lock:
            if not probe.acked:
                probe.acked, probe.via = True, via

    def _take_ack(
        self,
        target: Member,
        reply: cluster_pb2.PingResponse | None,
        record: member_pb2.Member,
        seen: member_pb2.Member | None,
    ) -> bool:
        """Merge what an ack (direct, or relayed by a helper) says; True if it is the target's."""
        try:
            own = member_from_proto(record)
            if own.node_id != target.node_id:
                return False  # another node answers at that address now: not our target's ack
            self._m.heard_from(own)
            if reply is not None:
                gossip = [member_from_proto(r) for r in reply.gossip[:MAX_GOSSIP_IN]]
                self._m.absorb(gossip, source=own.node_id, epoch=reply.header.epoch, digest=reply.view_digest)
            if seen is not None:
                self._m.absorb([member_from_proto(seen)], source=own.node_id)
        except ValueError as exc:
            self._warn(target.control_endpoint, f"ignoring the ack of {target.node_id}: {exc}")
            return False
        return True

    def _checked(self, method: str, endpoint: str, request: Any, future: grpc.Future) -> Any:
        """The answer if it came, proves the key and is from this cluster; else None (logged)."""
        exc = future.exception()
        if exc is not None:
            if isinstance(exc, grpc.Call) and exc.code() in _REFUSALS:
                self._error(endpoint, f"peer {endpoint} refused our {method.rsplit('/', 1)[-1]}: {describe_rpc_error(exc)}")
            return None
        reply = future.result()
        self._count("received", reply.ByteSize())
        try:
            self._peers.check_reply(method, request, reply)
        except ValueError as exc2:
            self._warn(endpoint, f"ignoring the answer of {endpoint}: {exc2}")
            return None
        if reply.header.cluster_id != self._m.cluster_id:
            self._error(
                endpoint,
                f"peer {endpoint} belongs to cluster {reply.header.cluster_id!r}, this node to "
                f"{self._m.cluster_id!r}: ignoring it (check --cluster-id and --seed)",
            )
            return None
        return reply

    def ping_for(self, target: Member, origin: str, timeout_s: float) -> cluster_pb2.PingResponse | None:
        """PingReq's work on this node: ping ``target`` for ``origin`` and wait; its ack or None."""
        request = self.ping_request(target, origin)
        self._count("sent", request.ByteSize())
        future = self._peers.ping(target.control_endpoint, request, timeout_s)
        try:
            future.exception(timeout=timeout_s + 0.5)
        except grpc.FutureTimeoutError:  # pragma: no cover - the call's own deadline ends it first
            future.cancel()
            return None
        reply = self._checked(PING, target.control_endpoint, request, future)
        if reply is None or not self._take_ack(target, reply, reply.member, _field(reply, "seen")):
            return None
        return reply

    def _echo_pings(self, exclude: str | None) -> None:
        """After a start or a wipe (or when a member joins) writes wait until every live peer has
        echoed our current life; rather than wait for round-robin to reach each of them, ping
        those few now. The ack's ``seen`` is the echo, and the ping's ``target`` gives the peer
        its own echo of its life. Only while some peer has not echoed, so steady-state traffic
        is unchanged; failures accuse nobody (that is the probes' job)."""
        sent = 0
        for m in self._m.unechoed():
            if sent >= MAX_ECHO_PINGS:
                break
            with self._lock:
                if m.node_id == exclude or m.node_id in self._echo_pending:
                    continue
                self._echo_pending.add(m.node_id)
            request = self.ping_request(m)
            self._count("sent", request.ByteSize())
            future = self._peers.ping(m.control_endpoint, request, self.direct_timeout_s)
            future.add_done_callback(lambda f, t=m, r=request: self._on_echo_ping(t, r, f))
            sent += 1

    def _on_echo_ping(self, target: Member, request: cluster_pb2.PingRequest, future: grpc.Future) -> None:
        with self._lock:
            self._echo_pending.discard(target.node_id)
        if future.cancelled():
            return
        reply = self._checked(PING, target.control_endpoint, request, future)
        if reply is not None:
            self._take_ack(target, reply, reply.member, _field(reply, "seen"))

    # ------------------------------------------------------------------ anti-entropy

    def _anti_entropy(self, peer: Member) -> None:
        epoch, members = self._m.view()
        request = cluster_pb2.HeartbeatRequest(
            member=member_to_proto(self._m.local),
            view=view_to_proto(epoch, members),
            nonce=fresh_nonce(),
            cluster_id=self._m.cluster_id,
        )
        sent = self._peers.heartbeat(
            peer.control_endpoint,
            request,
            self.probe_timeout_s,
            lambda f: self._on_anti_entropy(peer, request, f),
        )
        if sent:
            self._count("sent", request.ByteSize())

    def _on_anti_entropy(self, peer: Member, request: cluster_pb2.HeartbeatRequest, future: grpc.Future) -> None:
        if future.cancelled():
            return
        reply = self._checked(HEARTBEAT, peer.control_endpoint, request, future)
        if reply is None:
            return
        try:
            record = member_from_proto(reply.member)
            epoch, members = view_from_proto(reply.view)
            self._m.heard_from(record)
            self._m.merge(epoch, members, source=record.node_id)
        except ValueError as exc:
            self._warn(peer.control_endpoint, f"ignoring the anti-entropy answer of {peer.node_id}: {exc}")

    # ------------------------------------------------------------------ logging

    def _warn(self, key: str, message: str) -> None:
        if self._logged.allow(key):
            log.warning("%s", message)

    def _error(self, key: str, message: str) -> None:
        if self._logged.allow(key):
            log.error("%s", message)


def _field(message: Any, name: str) -> Any:
    """A sub-message if the sender set it, else None (protobuf hands out empty defaults)."""
    return getattr(message, name) if message.HasField(name) else None
