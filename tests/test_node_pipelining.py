"""Several requests on one raw connection before reading: answered in order, each with its request id."""

from __future__ import annotations

import rawwire
from nodeproc import NodeProcess

from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import RESPONSE_BIT, Op, Status
from lmcache_memkv.wire.messages import (
    DeleteRequest,
    DeleteResponse,
    ExistsRequest,
    ExistsResponse,
    GetRequest,
    GetResponse,
    ListRequest,
    ListResponse,
    PingRequest,
    PingResponse,
    PutRequest,
    PutResponse,
    ReleaseRequest,
    ReleaseResponse,
    StatsRequest,
    StatsResponse,
    encode,
)


def test_pipelined_requests_are_answered_with_matching_ids(shared_node: NodeProcess) -> None:
    v1, v2 = b"first value", b"second" * 1000
    ver1, ver2, ver_del = CLOCK.next(3)
    batch = b"".join(
        [
            encode(PutRequest(keys=[b"pipe/1", b"pipe/2"], sizes=[len(v1), len(v2)], versions=[ver1, ver2]), 101) + v1 + v2,
            encode(ExistsRequest(keys=[b"pipe/1", b"pipe/none"], lease_ttl_ms=60_000), 102),
            encode(GetRequest(keys=[b"pipe/2", b"pipe/none", b"pipe/1"], capacities=[1 << 20] * 3), 103),
            encode(ReleaseRequest(lease_ids=[1]), 104),  # not a lease of ours: harmless
            encode(PingRequest(data=b"hi"), 0xFFFFFFFF),
            encode(ListRequest(prefix=b"pipe/", limit=10), 105),
            encode(DeleteRequest(keys=[b"pipe/1"], versions=[ver_del]), 7),
            encode(StatsRequest(), 106),
        ]
    )
    sock = rawwire.connect(shared_node.address)
    try:
        sock.sendall(batch)  # all eight requests are on the wire before we read anything
        answers = [rawwire.read_frame(sock) for _ in range(8)]
    finally:
        sock.close()
    assert [h.request_id for h, _, _ in answers] == [101, 102, 103, 104, 0xFFFFFFFF, 105, 7, 106]
    assert all(h.op & RESPONSE_BIT for h, _, _ in answers)
    (_, put, _), (_, exists, _), (_, get, payload), (_, release, _) = answers[:4]
    (_, ping, _), (_, listing, _), (_, delete, _), (stats_h, stats, _) = answers[4:]
    assert put == PutResponse(statuses=[Status.OK, Status.OK])
    assert isinstance(exists, ExistsResponse) and exists.lease_ids[0] != 0
    assert exists == ExistsResponse(
        statuses=[Status.OK, Status.MISS], lengths=[len(v1), 0], versions=[ver1, 0], lease_ids=[exists.lease_ids[0], 0]
    )
    assert get == GetResponse(
        statuses=[Status.OK, Status.MISS, Status.OK], lengths=[len(v2), 0, len(v1)], versions=[ver2, 0, ver1]
    )
    assert payload == v2 + v1  # hits only, in request order
    assert release == ReleaseResponse(statuses=[Status.NOT_LEASED])
    assert ping == PingResponse(data=b"hi")
    assert isinstance(listing, ListResponse) and listing.keys == [b"pipe/1", b"pipe/2"]
    assert delete == DeleteResponse(statuses=[Status.OK])
    assert stats_h.base_op is Op.STATS and isinstance(stats, StatsResponse) and b"node_id" in stats.body
