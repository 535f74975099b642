"""ClusterClient under partial failure: a frozen node, a node failing part way through a batch,
and the lease book's memory under endless re-grants."""

from __future__ import annotations

import itertools
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from cluster_util import InProcCluster, InProcNode, wait_until
from hypothesis import example, given, settings
from hypothesis import strategies as st
from nodeproc import NodeProcess

from lmcache_memkv.client import NodeClient
from lmcache_memkv.client.protocol import Buffer, DataClient
from lmcache_memkv.cluster import ClusterClient
from lmcache_memkv.cluster.lanes import LaneBusy, NodeLanes
from lmcache_memkv.cluster.leases import LeaseBook
from lmcache_memkv.errors import ConnectError
from lmcache_memkv.wire.constants import Status
from lmcache_memkv.wire.messages import ExistsResponse, GetResponse

NodeFactory = Callable[..., NodeProcess]
KEY = bytes(range(40, 72))
ENV = {"MEMKV_AUTH_KEY": KEY.hex()}

# ---------------------------------------------------------------------------- a frozen node

# Slow failure detection: the frozen node stays ALIVE or SUSPECT (so in placement) all through
# the burst; what is tested is the client's own bounds, not the cluster's verdict.
SLOW_DETECTION = ["--heartbeat-interval", "0.5", "--suspect-after", "8", "--dead-after", "16"]
TIMEOUT_S = 2.0
# The client waits at most its deadline plus a short grace for a running node call; the rest
# is thread scheduling on a loaded two-core box.
CALL_BOUND_S = TIMEOUT_S + 0.25 + 1.25
CALLERS = 40  # more threads than the one 32-thread pool the client once shared among all nodes
BURST_S = 3.0


def test_a_frozen_node_neither_stalls_calls_nor_starves_the_healthy_nodes(node_factory: NodeFactory) -> None:
    nodes: list[NodeProcess] = []
    for name in ("n1", "n2", "n3"):
        args = ["--node-id", name, *SLOW_DETECTION]
        if nodes:
            args += ["--seed", str(nodes[0].control)]
        nodes.append(node_factory(capacity="32MiB", metrics=False, args=args, env=ENV))
    client = ClusterClient([str(nodes[0].control)], key=KEY, replicas=2, timeout_s=TIMEOUT_S)
    victim: NodeProcess | None = None
    try:
        client.start()
        wait_until("client sees three ALIVE members", lambda: len(client.placement(b"x")) == 3, 20.0)
        keys = [f"frozen-{i:05d}".encode() for i in range(1200)]
        values = {k: bytes([i % 251]) * (200 + i % 97) for i, k in enumerate(keys)}
        for i in range(0, len(keys), 300):
            part = keys[i : i + 300]
            assert client.put(part, [values[k] for k in part]) == [True] * len(part)
        # Freeze a node the client does not watch (the view stays live; the freeze is only felt
        # on the data plane, where connections hang rather than being refused).
        victim = frozen = next(n for n in nodes if n.control != client.health()["watching"])
        on_victim = sum(frozen.node_id in client.placement(k)[:2] for k in keys)
        assert on_victim > len(keys) // 3  # it holds a replica of many keys
        frozen.signal(signal.SIGSTOP)

        durations: dict[str, list[float]] = {"get": [], "exists": [], "put": []}
        problems: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(CALLERS)
        end_at = [0.0]

        def caller(t: int) -> None:
            rng = random.Random(t)
            start.wait()
            if t == 0:
                end_at[0] = time.monotonic() + BURST_S
            n = 0
            while n == 0 or time.monotonic() < end_at[0]:
                kind = ("get", "exists", "put")[(t + n) % 3]
                sample = rng.sample(keys, 48)
                began = time.monotonic()
                if kind == "get":
                    buffers = [bytearray(len(values[k])) for k in sample]
                    got = client.get_into(sample, buffers)
                    bad = [k for k, m, b in zip(sample, got, buffers) if m != len(values[k]) or bytes(b) != values[k]]
                elif kind == "exists":
                    found = client.exists(sample)
                    bad = [k for k, m in zip(sample, found) if m != len(values[k])]
                else:
                    new = [f"burst-{t}-{n}-{j}".encode() for j in range(8)]
                    acked = client.put(new, [b"v" * 64] * len(new))
                    # A write placed on the frozen node cannot be acknowledged; every other must be.
                    bad = [k for k, ok in zip(new, acked) if not ok and frozen.node_id not in client.placement(k)[:2]]
                took = time.monotonic() - began
                with lock:
                    durations[kind].append(took)
                    if bad:
                        problems.append(f"{kind}: {len(bad)} keys with a healthy replica failed, e.g. {bad[0]!r}")
                n += 1

        threads = [threading.Thread(target=caller, args=(t,), daemon=True) for t in range(CALLERS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(BURST_S + 10 * CALL_BOUND_S)
        assert not any(th.is_alive() for th in threads), "a caller is stuck"
        assert frozen.node_id in client.placement(b"x"), "the frozen node left placement during the burst"
        worst = {kind: max(ts) for kind, ts in durations.items()}
        print(
            f"\nfrozen {frozen.node_id} (replica of {on_victim} of {len(keys)} keys), {CALLERS} callers for {BURST_S}s: "
            + ", ".join(f"{kind} {len(ts)} calls, max {worst[kind]:.2f}s" for kind, ts in durations.items())
            + f" (bound {CALL_BOUND_S:.2f}s)"
        )
        assert not problems, problems[:10]
        assert max(worst.values()) <= CALL_BOUND_S
    finally:
        if victim is not None:
            victim.signal(signal.SIGCONT)
        client.close()


# ---------------------------------------------------------------------------- one chunk fails

CHUNK = 512  # keys per node request (ClusterClient's _CHUNK)


class SecondCallFails(NodeClient):
    """Fault injection: a real node client whose second call of one operation fails, as a node
    dropping its connection mid-batch would; every other call goes to the node."""

    def __init__(self, endpoint: str, key: bytes | None, timeout_s: float, client_id: bytes, fail: str) -> None:
        super().__init__(endpoint, key, timeout_s, client_id=client_id)
        self.fail = fail
        self.calls = 0

    def _maybe_fail(self, op: str) -> None:
        if op == self.fail:
            self.calls += 1
            if self.calls == 2:
                raise ConnectError(f"memkv node {self.endpoint}: injected failure of the second {op}")

    def put(
        self,
        keys: Sequence[bytes],
        values: Sequence[Buffer],
        timeout_s: float | None = None,
        versions: Sequence[int] | None = None,
    ) -> list[Status]:
        self._maybe_fail("put")
        return super().put(keys, values, timeout_s, versions)

    def read_into(
        self, keys: Sequence[bytes], buffers: Sequence[Buffer], timeout_s: float | None = None, exact: bool = False
    ) -> GetResponse:
        self._maybe_fail("read_into")
        return super().read_into(keys, buffers, timeout_s, exact)

    def lookup(self, keys: Sequence[bytes], lease_ttl_s: float = 0.0, timeout_s: float | None = None) -> ExistsResponse:
        self._maybe_fail("lookup")
        return super().lookup(keys, lease_ttl_s, timeout_s)

    def release(self, lease_ids: Sequence[int], timeout_s: float | None = None) -> list[bool]:
        self._maybe_fail("release")
        return super().release(lease_ids, timeout_s)

    def delete_versions(self, keys: Sequence[bytes], versions: Sequence[int], timeout_s: float | None = None) -> list[Status]:
        self._maybe_fail("delete_versions")
        return super().delete_versions(keys, versions, timeout_s)


@pytest.fixture(scope="module")
def pair() -> Iterator[InProcCluster]:
    c = InProcCluster()
    try:
        c.add("p1", key=KEY, capacity=32 << 20)
        c.add("p2", key=KEY, capacity=32 << 20)
        c.wait_converged(key=KEY)
        yield c
    finally:
        c.stop()


def _faulty_client(cluster: InProcCluster, faulty: InProcNode, fail: str) -> ClusterClient:
    """R=1 (a failed chunk has no other replica to fail over to); ``fail`` breaks on ``faulty`` only."""

    def factory(endpoint: str, key: bytes | None, timeout_s: float, client_id: bytes) -> DataClient:
        if endpoint == faulty.data:
            return SecondCallFails(endpoint, key, timeout_s, client_id, fail)
        return NodeClient(endpoint, key, timeout_s, client_id=client_id)

    client = ClusterClient([cluster.nodes[0].control], key=KEY, replicas=1, timeout_s=5.0, data_client_factory=factory)
    client.start()
    wait_until("client sees both members", lambda: len(client.placement(b"x")) == 2, 10.0)
    return client


def _keys_and_split(client: ClusterClient, faulty: InProcNode, tag: str) -> tuple[list[bytes], set[bytes], set[bytes]]:
    """1600 keys; those on the faulty node in its first chunk, and in its later ones."""
    keys = [f"{tag}-{i:05d}".encode() for i in range(1600)]
    mine = [k for k in keys if client.placement(k)[0] == faulty.node_id]
    assert CHUNK < len(mine) <= 2 * CHUNK  # two chunks: the second fails
    return keys, set(mine[:CHUNK]), set(mine[CHUNK:])


def _value(key: bytes) -> bytes:
    return key * 4


def _stored(node: InProcNode, keys: Sequence[bytes]) -> list[int | None]:
    with NodeClient(node.data, KEY) as nc:
        return [n for i in range(0, len(keys), CHUNK) for n in nc.exists(list(keys[i : i + CHUNK]))]


def test_a_failed_chunk_keeps_the_chunks_before_it(pair: InProcCluster) -> None:
    faulty, healthy = pair.nodes
    # PUT: the faulty node's first chunk is stored and acknowledged, its second is not.
    client = _faulty_client(pair, faulty, "put")
    try:
        keys, first, rest = _keys_and_split(client, faulty, "chunk")
        acked = client.put(keys, [_value(k) for k in keys])
        assert [k for k, ok in zip(keys, acked) if not ok] == [k for k in keys if k in rest]
    finally:
        client.close()
    # Store the rest so every key is on its node for what follows.
    with NodeClient(faulty.data, KEY) as nc:
        late = sorted(rest)
        assert nc.put(late, [_value(k) for k in late]) == [Status.OK] * len(late)

    # GET: the first chunk's reads are kept; the failed chunk's keys are misses (no other replica).
    client = _faulty_client(pair, faulty, "read_into")
    try:
        buffers = [bytearray(len(_value(k))) for k in keys]
        got = client.get_into(keys, buffers)
        for k, n, buf in zip(keys, got, buffers):
            if k in rest:
                assert n is None, k
            else:
                assert n == len(_value(k)) and bytes(buf) == _value(k), k
    finally:
        client.close()

    # EXISTS with leases: the first chunk's answers and leases are kept and recorded, so the
    # leases are released later, not left on the node until their TTL.
    client = _faulty_client(pair, faulty, "lookup")
    try:
        found = client.exists(keys, lease_ttl_s=60)
        assert [k for k, n in zip(keys, found) if n is None] == [k for k in keys if k in rest]
        assert client.health()["leases_held"] == len(keys) - len(rest)
        assert faulty.server.stats()["leases"] == len(first)
        assert client.health()["releases_owed"] == 0
        client.release(keys)
        assert healthy.server.stats()["leases"] == 0 and client.health()["leases_held"] == 0
        # The faulty node is in the client's back-off after its failure: its releases are owed,
        # and sent once the back-off is over.
        wait_until("the first chunk's leases released", lambda: faulty.server.stats()["leases"] == 0, 20.0)
        assert client.health()["releases_owed"] == 0
    finally:
        client.close()

    # RELEASE: a failed chunk of releases is owed and retried until it lands.
    client = _faulty_client(pair, faulty, "release")
    try:
        assert None not in client.exists(keys, lease_ttl_s=60)
        assert faulty.server.stats()["leases"] == len(first) + len(rest)
        client.release(keys)
        assert faulty.server.stats()["leases"] == len(rest)  # the first chunk landed at once
        wait_until("the failed chunk of releases lands", lambda: faulty.server.stats()["leases"] == 0, 20.0)
        assert client.health()["releases_owed"] == 0
    finally:
        client.close()

    # DELETE goes to every node in request order: the first chunk is durable, the rest is not.
    client = _faulty_client(pair, faulty, "delete_versions")
    try:
        durable = client.delete(keys)
        assert durable == [True] * CHUNK + [False] * (len(keys) - CHUNK)
        assert _stored(healthy, keys) == [None] * len(keys)
        left = [k for k, n in zip(keys, _stored(faulty, keys)) if n is not None]
        assert left == [k for k in keys[CHUNK:] if k in first | rest]  # its failed chunks were not deleted
    finally:
        client.close()


# ---------------------------------------------------------------------------- lease book memory


def test_lease_book_memory_follows_the_leases_held_under_endless_regrants() -> None:
    keys = [f"k{i}".encode() for i in range(20)]
    slack = LeaseBook._COMPACT_SLACK

    # Locked and unlocked again and again (LMCache leases per request): nothing accumulates.
    book = LeaseBook()
    for r in range(2000):
        book.add_many(((k, ("n", 1), r * 100 + j) for j, k in enumerate(keys)), until=r * 0.01 + 5.0)
        assert None not in book.take_many(keys)
        records, heap = book.footprint()
        assert records == 0 and heap <= len(keys) + slack

    # Leased again and again, never released (unlocks that never come): each lease lives to its
    # own TTL, so what the book holds follows the leases alive, not the grants made.
    book = LeaseBook()
    ttl, step = 1.0, 0.05
    until: list[float] = []
    for r in range(2000):
        now = r * step
        book.add_many(((k, ("n", 1), r * 100 + j) for j, k in enumerate(keys)), until=now + ttl)
        until.append(now + ttl)
        if r % 4 == 0:  # the client's housekeeping runs every few grants
            book.expire(now)
            alive = sum(u > now for u in until) * len(keys)
            records, heap = book.footprint()
            assert records == book.count() == alive
            assert heap <= 2 * records + slack  # the expiry heap's references follow the records
    assert book.count() <= len(keys) * (ttl / step + 4)


class AnswersTooLate(NodeClient):
    """Fault injection: a transport that overruns its deadline, answering a lookup (leases
    granted on the node) only after the caller has stopped waiting."""

    aborts: list[tuple[threading.Thread, bool]] = []  # class-wide: the factory makes the instances
    running = False

    def lookup(self, keys: Sequence[bytes], lease_ttl_s: float = 0.0, timeout_s: float | None = None) -> ExistsResponse:
        reply = super().lookup(keys, lease_ttl_s, timeout_s)
        self.running = True
        time.sleep((timeout_s or self.timeout_s) + 1.0)
        self.running = False
        return reply

    def abort_transfers(self) -> None:
        # Records who aborted, and whether the call was still running then (it must be).
        self.aborts.append((threading.current_thread(), self.running))


def test_leases_answered_after_the_caller_gave_up_are_released(pair: InProcCluster) -> None:
    slow, healthy = pair.nodes

    def factory(endpoint: str, key: bytes | None, timeout_s: float, client_id: bytes) -> DataClient:
        cls = AnswersTooLate if endpoint == slow.data else NodeClient
        return cls(endpoint, key, timeout_s, client_id=client_id)

    client = ClusterClient([pair.nodes[0].control], key=KEY, replicas=1, timeout_s=1.0, data_client_factory=factory)
    try:
        client.start()
        wait_until("client sees both members", lambda: len(client.placement(b"x")) == 2, 10.0)
        keys = [f"late-{i:03d}".encode() for i in range(60)]
        on_slow = {k for k in keys if client.placement(k)[0] == slow.node_id}
        assert 0 < len(on_slow) < len(keys)
        with NodeClient(slow.data, KEY) as a, NodeClient(healthy.data, KEY) as b:
            for nc in (a, b):
                assert Status.STALE not in nc.put(keys, [_value(k) for k in keys])
        began = time.monotonic()
        found = client.exists(keys, lease_ttl_s=60)
        took = time.monotonic() - began
        assert took < client.timeout_s + 1.0  # it did not wait for the late answer
        # And before returning it aborted the slow node's transfers itself (RDMA: fenced its
        # session), from the caller's thread, while that call was still running.
        assert AnswersTooLate.aborts == [(threading.current_thread(), True)]
        assert [k for k, n in zip(keys, found) if n is None] == [k for k in keys if k in on_slow]
        assert client.health()["leases_held"] == len(keys) - len(on_slow)
        # The late answer's leases are recorded nowhere: they are given back, not left to their TTL.
        wait_until("the late answer's leases released", lambda: slow.server.stats()["leases"] == 0, 20.0)
        client.release(keys)
        assert healthy.server.stats()["leases"] == 0
    finally:
        client.close()


def test_a_blocked_lane_leaves_the_other_nodes_threads_free() -> None:
    lanes = NodeLanes(threads_per_node=2)
    gate = threading.Event()
    far = time.monotonic() + 60
    try:
        stuck = [lanes.submit("frozen", lambda: gate.wait(30), far) for _ in range(5)]
        wait_until("the frozen node's lane is full", lambda: sum(f.running() for f in stuck) == 2, 5.0)
        assert lanes.submit("healthy", lambda: 42, far).result(timeout=5) == 42
        assert sum(f.running() for f in stuck) == 2  # the frozen node holds its own share, no more
        assert lanes.slot_here("frozen") is None  # nor may a caller's own thread add to it
        slot = lanes.slot_here("healthy")
        assert slot is not None
        slot.release()
        # Work that finds no free slot by its deadline fails as busy instead of waiting on.
        with pytest.raises(LaneBusy):
            blocker = lanes.slot_here("healthy")
            other = lanes.slot_here("healthy")
            assert blocker is not None and other is not None
            try:
                lanes.submit("healthy", lambda: 0, time.monotonic() + 0.05).result(timeout=5)
            finally:
                blocker.release()
                other.release()
        assert lanes.retire({"healthy"}) == ["frozen"]
        assert all(f.cancelled() for f in stuck[2:])  # queued work of a retired lane is dropped
        assert lanes.node_ids() == ["healthy"]
    finally:
        gate.set()
        lanes.close()


class ShortAnswers(NodeClient):
    """Fault injection: a transport whose EXISTS answer has one entry fewer than keys asked
    (a broken or hostile implementation of DataClient)."""

    def lookup(self, keys: Sequence[bytes], lease_ttl_s: float = 0.0, timeout_s: float | None = None) -> ExistsResponse:
        reply = super().lookup(keys, lease_ttl_s, timeout_s)
        return ExistsResponse(
            statuses=list(reply.statuses)[:-1],
            lengths=list(reply.lengths)[:-1],
            versions=list(reply.versions)[:-1],
            lease_ids=list(reply.lease_ids)[:-1],
        )


def test_an_answer_of_the_wrong_length_is_a_miss_for_that_node(pair: InProcCluster) -> None:
    broken = pair.nodes[0]
    errors: list[tuple[str, str]] = []

    def factory(endpoint: str, key: bytes | None, timeout_s: float, client_id: bytes) -> DataClient:
        cls = ShortAnswers if endpoint == broken.data else NodeClient
        return cls(endpoint, key, timeout_s, client_id=client_id)

    client = ClusterClient(
        [pair.nodes[0].control], key=KEY, replicas=1, timeout_s=2.0, data_client_factory=factory,
        on_node_error=lambda node_id, kind: errors.append((node_id, kind)),
    )
    try:
        client.start()
        wait_until("client sees both members", lambda: len(client.placement(b"x")) == 2, 10.0)
        keys = [f"short-{i:03d}".encode() for i in range(40)]
        on_broken = {k for k in keys if client.placement(k)[0] == broken.node_id}
        assert 0 < len(on_broken) < len(keys)
        assert client.put(keys, [_value(k) for k in keys]) == [True] * len(keys)
        found = client.exists(keys)
        assert [k for k, n in zip(keys, found) if n is None] == [k for k in keys if k in on_broken]
        assert errors == [(broken.node_id, "protocol")]
    finally:
        client.close()


# A grant batch of (key index, lease id) pairs and its expiry; a take of key indexes; an expiry time.
_lease_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(0, 5), max_size=6), st.sampled_from([1.0, 2.0, 3.0, math.inf])),
        st.tuples(st.just("take"), st.lists(st.integers(0, 5), max_size=6), st.just(0.0)),
        st.tuples(st.just("expire"), st.just([]), st.floats(0.0, 4.0)),
    ),
    max_size=60,
)


@given(_lease_ops)
@example([("add", [0, 1, 2], 1.0), ("take", [0, 1], 0.0), ("expire", [], 3.0)])  # a rebuild keeps k2's expiry
@example([("add", [0], 1.0), ("add", [0], 2.0), ("take", [0], 0.0), ("expire", [], 1.0)])  # expiry leaves a stale entry
@settings(max_examples=400)
def test_lease_book_agrees_with_a_list_of_leases(ops: list[tuple[str, list[int], float]]) -> None:
    """One heap entry per grant batch (not per key) keeps every lease to its own TTL and gives
    the latest lease of a key back first: checked against a plain list of every lease."""

    class Book(LeaseBook):
        _COMPACT_SLACK = 0  # rebuild the heap often, so rebuilds are checked too

    book = Book()
    model: dict[bytes, list[tuple[int, float]]] = {}  # key -> [(lease id, until)], oldest first
    ids = itertools.count(1)
    clock = 0.0
    for op, idx, t in ops:
        keys = [b"k%d" % i for i in idx]
        if op == "add":
            grants = [(k, ("n", 1), next(ids)) for k in keys]
            until = clock + t
            book.add_many(grants, until)
            for k, _, lease_id in grants:
                model.setdefault(k, []).append((lease_id, until))
        elif op == "take":
            want = [((("n", 1), model[k].pop()[0]) if model.get(k) else None) for k in keys]
            assert book.take_many(keys) == want
        else:
            clock = max(clock, t)  # monotonic
            gone = sum(1 for leases in model.values() for _, until in leases if until <= clock)
            model = {k: [x for x in v if x[1] > clock] for k, v in model.items()}
            assert book.expire(clock) == gone
        records, refs = book.footprint()
        assert records == book.count() == sum(len(v) for v in model.values())
        assert refs <= 2 * records
        assert [book.holders(b"k%d" % i) for i in range(6)] == [["n"] if model.get(b"k%d" % i) else [] for i in range(6)]


def test_a_failing_grant_iterable_leaves_the_lease_book_as_it_was() -> None:
    book = LeaseBook()
    book.add(b"k0", ("n", 1), 1, until=10.0)

    def grants() -> Iterator[tuple[bytes, tuple[str, int], int]]:
        yield b"k1", ("n", 1), 2
        raise KeyError("member gone")

    with pytest.raises(KeyError):
        book.add_many(grants(), until=10.0)
    assert book.count() == 1 and book.holders(b"k1") == []
    assert book.expire(10.0) == 1 and book.count() == 0


def test_expiring_a_key_leased_many_times_looks_at_each_lease_once() -> None:
    """A key locked again and again without unlocks has a heap entry per lock; expiring them
    must not filter the key's whole lease list once per entry (quadratic: with 2,000 locks of 64
    keys the book's lock was held for a second, stalling every lookup). Counted, not timed."""
    looked = 0

    class Until(float):
        def __gt__(self, other: object) -> bool:
            nonlocal looked
            looked += 1
            return float(self) > float(other)  # type: ignore[arg-type]

    keys = [b"k%d" % i for i in range(8)]
    book = LeaseBook()
    for r in range(200):
        book.add_many(((k, ("n", 1), r * 100 + j) for j, k in enumerate(keys)), until=Until(1.0 + r))
    assert book.expire(100.5) == 100 * len(keys)
    assert book.count() == 100 * len(keys)
    assert looked <= 200 * len(keys)  # each of the 1,600 leases compared once (before: 80,800)
