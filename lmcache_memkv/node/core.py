"""The node's request handler, transport-neutral: it plans, a mover moves the bytes.

For a decoded request the core checks the fence and the connection's generation, then makes a
plan: a PUT reserves an arena extent per value (only when the mover is about to bring that
value's bytes, so a peer that stops early makes the node evict at most what it began) and
publishes it once the bytes are in; a GET pins the extents it found until the mover has sent
them; anything else is answered inline. The mover (``movers.py``) executes the plan over its
transport and sends the answer. The core never touches a socket, so an RDMA mover (the node
READs each PUT value from the client's registered page into the extent, WRITEs each GET value
into the client's page) uses the same plans.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, cast

from lmcache_memkv.errors import ProtocolError
from lmcache_memkv.node.arena import Arena
from lmcache_memkv.node.config import NodeConfig
from lmcache_memkv.node.fence import Fence
from lmcache_memkv.node.metrics import NodeMetrics
from lmcache_memkv.node.movers import Mover, RdmaMovers
from lmcache_memkv.node.store import Extent, Fenced, Store
from lmcache_memkv.wire.constants import ErrorCode, Op, Status
from lmcache_memkv.wire.frames import Header
from lmcache_memkv.wire.messages import (
    DeleteRequest,
    DeleteResponse,
    ExistsRequest,
    ExistsResponse,
    GetRequest,
    GetResponse,
    ListRequest,
    ListResponse,
    Message,
    PingRequest,
    PingResponse,
    PutRequest,
    PutResponse,
    RdmaGetRequest,
    RdmaGetResponse,
    RdmaPutRequest,
    RdmaPutResponse,
    ReleaseRequest,
    ReleaseResponse,
    StatsResponse,
    encode,
)

log = logging.getLogger("memkv.node.core")


class PutPlan:
    """One PUT: the mover claims each value's destination in order, fills it, and reports it landed.

    ``claim(i)`` reserves the extent (or refuses the value: NOT_READY while writes are gated,
    STALE, NO_SPACE, TOO_LARGE) and returns the arena view to fill, or None when the mover must
    discard the value's bytes instead. ``landed`` publishes the oldest claimed value not yet
    published (a mover may claim several values whose bytes have all arrived, read them in one
    call, then report each landed); ``abandon`` gives back every extent claimed and not landed
    when the transfer failed.
    """

    def __init__(self, core: NodeCore, rid: int, msg: PutRequest | RdmaPutRequest, generation: int) -> None:
        self._core = core
        self.rid = rid
        self.keys = msg.keys
        self.sizes = msg.sizes
        self.versions = msg.versions
        self._generation = generation
        self._writable = core.write_gate()  # asked once per request, as before the split
        self._next = 0  # the next value to claim
        self._claimed: deque[tuple[int, Extent]] = deque()  # claimed, not landed, oldest first
        self.statuses: list[Status | None] = [None] * len(msg.keys)  # None: not answered (yet)
        self._response = RdmaPutResponse if isinstance(msg, RdmaPutRequest) else PutResponse

    def claim(self, i: int) -> memoryview | None:
        view = self._claim(i, tentative=False)
        assert view is not False
        return view

    def claim_ahead(self, i: int) -> memoryview | Literal[False] | None:
        """``claim``, for a value read together with the claimed ones before it, not yet landed:
        False, nothing claimed, where the node has no room for it. One at a time the node could
        have evicted those (just landed) for it; claimed again once they land, it still can."""
        return self._claim(i, tentative=True)

    def _claim(self, i: int, tentative: bool) -> memoryview | Literal[False] | None:
        assert i == self._next, "values are claimed in order"
        store = self._core.store
        key, size, version = self.keys[i], self.sizes[i], self.versions[i]
        if self._writable:
            slot = store.reserve(key, size, version, self._generation, tentative)
            if slot is None:
                return False
        else:
            slot = store.refuse(key, version, self._generation)
        self._next += 1
        if isinstance(slot, Extent):
            self._claimed.append((i, slot))
            return self._core.arena.view[slot.offset : slot.offset + size]
        self.statuses[i] = slot
        return None

    def landed(self) -> None:
        i, slot = self._claimed.popleft()
        self.statuses[i] = self._core.store.publish(self.keys[i], slot, self.versions[i], self._generation)

    def abandon(self) -> None:
        while self._claimed:
            self._core.store.abort(self._claimed.popleft()[1])

    def quarantine(self) -> None:
        """Drop the claimed extents without giving them back: the RDMA fence could not confirm
        that no late READ lands in them, and leaking their bytes is better than serving a torn value."""
        while self._claimed:
            slot = self._claimed.popleft()[1]
            log.error("RDMA fence unconfirmed: quarantining %d arena bytes at offset %d", slot.length, slot.offset)

    def answer(self) -> bytes:
        """The PUT's response frame, once every value has been claimed and every claim has landed."""
        assert self._next == len(self.keys) and not self._claimed, "a PUT is answered once every value is settled"
        core = self._core
        core.metrics.bytes_in.labels(core.node_label).inc(sum(self.sizes))
        core.metrics.items.labels(core.node_label, "put").inc(len(self.keys))
        return encode(self._response(statuses=cast(list[Status], self.statuses)), self.rid)

    @property
    def outcome(self) -> str:
        return "ok" if all(s == Status.OK for s in self.statuses) else "partial"


class GetPlan:
    """One GET: extents pinned (an overwrite cannot tear them) until ``release``; ``head`` answers."""

    def __init__(self, core: NodeCore, rid: int, msg: GetRequest | RdmaGetRequest) -> None:
        self._core = core
        self.extents: list[Extent] = []
        self.found: list[int] = []  # request positions of ``extents``, in order (where RDMA writes them)
        statuses: list[Status] = []
        lengths: list[int] = []
        versions: list[int] = []
        try:
            for key, cap in zip(msg.keys, msg.capacities, strict=True):
                status, ext, version = core.store.pin(key, cap, msg.exact)
                statuses.append(status)
                lengths.append(ext.length if ext else 0)
                versions.append(version)
                if status == Status.OK and ext is not None:
                    self.found.append(len(statuses) - 1)
                    self.extents.append(ext)
            response = RdmaGetResponse if isinstance(msg, RdmaGetRequest) else GetResponse
            self.head = encode(response(statuses=statuses, lengths=lengths, versions=versions), rid)
        except BaseException:
            self.release()
            raise
        self.count = len(msg.keys)

    def views(self) -> list[memoryview]:
        """The found values' bytes, in request order (views of the arena, no copies)."""
        view = self._core.arena.view
        return [view[e.offset : e.offset + e.length] for e in self.extents]

    def release(self) -> None:
        extents, self.extents = self.extents, []
        if extents:
            self._core.store.unpin(extents)

    def quarantine(self) -> None:
        """Keep the extents pinned for good: the RDMA fence could not confirm that no late WRITE
        still reads them, so no overwrite may ever fill them."""
        extents, self.extents = self.extents, []
        if extents:
            log.error("RDMA fence unconfirmed: %d extents stay pinned", len(extents))

    @property
    def outcome(self) -> str:
        return "ok" if len(self.extents) == self.count else "partial"


# The largest lookup, release or delete the event loop answers itself (about 0.4 ms of store
# work); bigger batches go to a worker, so one cannot hold up every other connection's reads.
INLINE_MAX_KEYS = 512


class NodeCore:
    """Serves one decoded request through a mover; shared by every connection and worker."""

    def __init__(
        self,
        config: NodeConfig,
        arena: Arena,
        store: Store,
        fence: Fence,
        metrics: NodeMetrics,
        write_gate: Callable[[], bool],
        stats: Callable[[], dict[str, int]],
        started_at: float,
        rdma: RdmaMovers | None = None,
    ) -> None:
        self.config = config
        self.arena = arena
        self.store = store
        self.fence = fence
        self.metrics = metrics
        self.node_label = config.node_id
        self.write_gate = write_gate
        self._stats = stats
        self._started_at = started_at
        self.rdma = rdma  # None: this node has no verbs device (RPUT/RGET are refused)

    def serve(self, header: Header, msg: Message, generation: int, client_id: bytes, mover: Mover, deadline: float) -> None:
        """Serve one request whose header and meta are in; raises ``Fenced`` or a transport error."""
        started = time.perf_counter()
        self._check_life(generation)
        rid = header.request_id
        outcome = "ok"
        transport = "tcp"
        if isinstance(msg, RdmaPutRequest | RdmaGetRequest):
            if self.rdma is None:
                raise ProtocolError("this node has no RDMA device: RPUT and RGET are not served", ErrorCode.UNKNOWN_OP)
            mover = self.rdma.mover(msg, client_id, mover)  # checks the session and every remote range
            transport = "rdma"
        if isinstance(msg, PutRequest | RdmaPutRequest):
            put = PutPlan(self, rid, msg, generation)
            try:
                mover.put(put, deadline)
            finally:
                put.abandon()  # no-op unless the transfer of a claimed value failed
            outcome = put.outcome
            landed = sum(n for n, st in zip(put.sizes, put.statuses, strict=False) if st == Status.OK)
            self.metrics.transport_bytes.labels(self.node_label, transport, "in").inc(landed)
        elif isinstance(msg, GetRequest | RdmaGetRequest):
            get = GetPlan(self, rid, msg)
            try:
                mover.get(get, deadline)
                sent = sum(e.length for e in get.extents)
                outcome = get.outcome
            finally:
                get.release()
            self.metrics.bytes_out.labels(self.node_label).inc(sent)
            self.metrics.transport_bytes.labels(self.node_label, transport, "out").inc(sent)
            self.metrics.items.labels(self.node_label, "get").inc(get.count)
        else:
            mover.reply([encode(self.inline(msg, client_id), rid)], deadline)
        self._count(header, outcome, started)

    def answer(self, header: Header, msg: Message, generation: int, client_id: bytes) -> bytes:
        """The encoded answer to a request that moves no value bytes (see ``answers_at_once``),
        counted as served: the event loop sends it itself. Raises ``Fenced``."""
        started = time.perf_counter()
        self._check_life(generation)
        frame = encode(self.inline(msg, client_id), header.request_id)
        self._count(header, "ok", started)
        return frame

    def _check_life(self, generation: int) -> None:
        self.fence.check()  # after a stall: drop the data before serving anything
        if generation != self.store.generation:
            raise Fenced("the node dropped its data since this connection was opened")

    def _count(self, header: Header, outcome: str, started: float) -> None:
        labels = (self.node_label, header.base_op.name.lower())
        self.metrics.ops.labels(*labels, outcome).inc()
        self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)

    @staticmethod
    def answers_at_once(msg: Message) -> bool:
        """Whether the event loop may answer ``msg`` itself rather than hand it to a worker: it
        moves no value bytes and is small, so it costs the loop about what the hand-over would
        (a lookup batch is answered one thread switch sooner, and one less GIL hand-over)."""
        if isinstance(msg, ExistsRequest | DeleteRequest):
            return len(msg.keys) <= INLINE_MAX_KEYS
        if isinstance(msg, ReleaseRequest):
            return len(msg.lease_ids) <= INLINE_MAX_KEYS
        return isinstance(msg, PingRequest)

    def inline(self, msg: Message, client_id: bytes) -> Message:
        """The answer to a request that moves no value bytes."""
        if isinstance(msg, ExistsRequest):
            found = self.store.exists(msg.keys, msg.lease_ttl_ms / 1000.0, client_id)
            # Rows to columns in C (zip), not four Python passes over the batch.
            statuses, lengths, versions, lease_ids = zip(*found, strict=True) if found else ((), (), (), ())
            return ExistsResponse(statuses=statuses, lengths=lengths, versions=versions, lease_ids=lease_ids)
        if isinstance(msg, ReleaseRequest):
            return ReleaseResponse(statuses=self.store.release(msg.lease_ids, client_id))
        if isinstance(msg, DeleteRequest):
            return DeleteResponse(statuses=self.store.delete(msg.keys, msg.versions))
        if isinstance(msg, ListRequest):
            items, cursor = self.store.list(msg.prefix, msg.cursor, msg.limit)
            return ListResponse(keys=[k for k, _ in items], sizes=[n for _, n in items], next_cursor=cursor)
        if isinstance(msg, PingRequest):
            return PingResponse(data=msg.data)
        if msg.op is Op.STATS:
            body = dict(self._stats(), node_id=self.config.node_id, uptime_s=int(time.time() - self._started_at))
            return StatsResponse(body=json.dumps(body).encode())
        raise ProtocolError(f"opcode {msg.op.name} is not a request", ErrorCode.UNKNOWN_OP)
