"""One event loop holds every connection: threads stay flat in the connection count, an idle node
sleeps (no periodic wake-ups), and shutdown wakes the loop at once through its wake descriptor."""

from __future__ import annotations

import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rawwire
from nodeproc import NodeFactory

from lmcache_memkv.client import NodeClient
from lmcache_memkv.errors import MemKVTimeout
from lmcache_memkv.node.config import NodeConfig
from lmcache_memkv.node.server import NodeServer
from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import ErrorCode, Status
from lmcache_memkv.wire.messages import ExistsRequest, ExistsResponse, PingRequest, PingResponse, PutRequest, encode

MANY = 2000


@pytest.fixture
def nofile() -> Iterator[None]:
    """This process holds one descriptor per connection it opens: raise the soft limit, restore it after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < MANY + 200:
        pytest.skip(f"open-file hard limit {hard} is below {MANY + 200}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _ping(sock: socket.socket, rid: int) -> None:
    sock.sendall(encode(PingRequest(data=b"%d" % rid), rid))
    header, reply, _ = rawwire.read_frame(sock)
    assert header.request_id == rid and reply == PingResponse(data=b"%d" % rid)


def test_two_thousand_connections_add_no_threads_and_are_all_served(node_factory: NodeFactory, nofile: None) -> None:
    node = node_factory(capacity="64MiB")
    few = [rawwire.connect(node.address) for _ in range(4)]
    many: list[socket.socket] = []
    try:
        for i, s in enumerate(few):
            _ping(s, i + 1)
        time.sleep(0.2)
        threads_few, rss_few = node.thread_count(), node.rss_kib()
        for _ in range(MANY):
            many.append(rawwire.connect(node.address, timeout_s=10))
        assert node.metric("memkv_node_connections") == MANY + len(few)
        threads_many, rss_many = node.thread_count(), node.rss_kib()
        print(f"\nnode threads {threads_few} -> {threads_many}, RSS {rss_few} -> {rss_many} KiB with {MANY} more connections")
        # One thread per connection would add 2000; the constant covers threads the node may
        # start for other reasons (an HTTP scrape, gRPC).
        assert threads_many <= threads_few + 3, (threads_few, threads_many)
        # Every connection is live and answers, and the node serves values meanwhile.
        for i, s in enumerate(many[:: MANY // 40]):
            _ping(s, 100 + i)
        with node.client() as c:
            value = bytes(range(256)) * 4096
            assert c.put([b"big"], [value]) == [Status.OK]
            out = bytearray(len(value))
            assert c.get_into([b"big"], [out]) == [len(value)] and out == value
        _ping(many[-1], 99)
    finally:
        for s in few + many:
            s.close()


def _switches(tid: int) -> int:
    total = 0
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
            total += int(line.split()[1])
    return total


def test_idle_node_sleeps_and_stop_wakes_it_at_once() -> None:
    """With idle authenticated connections and no idle timeout the loop has no deadline to keep:
    its threads are not scheduled at all until stop() writes to the loop's wake descriptor, and
    then every connection is told why it is closed, at once."""
    server = NodeServer(NodeConfig(listen="127.0.0.1:0", capacity=1 << 20, workers=4))
    server.start()
    socks: list[socket.socket] = []
    try:
        socks = [rawwire.connect(server.address) for _ in range(50)]
        for i, s in enumerate(socks):
            _ping(s, i + 1)
        with NodeClient(server.endpoint) as c:
            assert c.put([b"k"], [b"v"]) == [Status.OK]  # its pooled connection stays open too
            tids = server.thread_ids()
            time.sleep(0.3)  # let the last answers' bookkeeping settle
            before = sum(_switches(t) for t in tids)
            time.sleep(1.5)  # the old per-connection threads polled every 200 ms: 7 wake-ups each here
            woke = sum(_switches(t) for t in tids) - before
            assert woke <= 2, f"{len(tids)} loop and worker threads were scheduled {woke} times while idle"
            started = time.monotonic()
            assert server.stop(10.0)
            took = time.monotonic() - started
        assert took < 2.0, f"stop took {took:.2f}s with idle connections open"
        for s in socks:
            assert rawwire.expect_error(s).code == ErrorCode.SHUTTING_DOWN
    finally:
        for s in socks:
            s.close()
        server.stop(0)


def test_workers_setting_is_checked_and_sizes_the_pool() -> None:
    with pytest.raises(ValueError, match=r"--workers must be in 1\.\.1024"):
        NodeConfig(listen="127.0.0.1:0", capacity=1 << 20, workers=0)
    server = NodeServer(NodeConfig(listen="127.0.0.1:0", capacity=1 << 20, workers=3))
    server.start()
    try:
        assert len(server.thread_ids()) == 1 + 3  # the loop and its workers
    finally:
        server.stop(0)


def test_workers_from_the_settings_file(node_factory: NodeFactory, tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("workers: 5\n")
    node = node_factory(capacity="8MiB", args=["--config", str(config)])
    assert "(5 workers," in node.log()


def test_lookups_are_answered_by_the_loop_while_every_worker_waits_on_an_upload(node_factory: NodeFactory) -> None:
    # One worker, held by a PUT whose value never finishes arriving (until the frame timeout, far
    # off): lookups, releases, deletes and pings move no value bytes and are answered by the loop.
    node = node_factory(args=["--workers", "1", "--frame-timeout", "30"])
    with node.client() as c:
        assert c.put([b"here"], [b"v" * 100]) == [Status.OK]
    slow = rawwire.connect(node.address)
    try:
        slow.sendall(encode(PutRequest(keys=[b"slow"], sizes=[1 << 20], versions=CLOCK.next(1)), 1) + b"x" * 100)
        time.sleep(0.3)  # the worker is inside the transfer now
        with NodeClient(node.data, timeout_s=2.0) as c:  # were they queued for the worker: a timeout
            reply = c.lookup([b"here", b"slow", b"none"], lease_ttl_s=30)
            assert list(reply.statuses) == [Status.OK, Status.MISS, Status.MISS]
            assert c.release([reply.lease_ids[0]]) == [True]
            assert c.delete_versions([b"none"], CLOCK.next(1)) == [Status.MISS]
            assert c.ping() < 2.0
            # A request with value bytes still waits for the one worker.
            with pytest.raises(MemKVTimeout):
                c.get_into([b"here"], [bytearray(100)], timeout_s=0.5)
    finally:
        slow.close()


def test_pipelined_lookup_answers_read_late_arrive_whole_and_in_order(node_factory: NodeFactory) -> None:
    # The client reads nothing for a while, through a small receive window, while it sends more
    # answers' worth than the node's send buffer holds: the loop cannot send some answers whole,
    # and a worker finishes them.
    node = node_factory()
    keys = [b"%03x" % i for i in range(512)]  # short keys: each answer is several times its request
    with node.client() as c:
        assert c.put(keys, [b"v" * (i + 1) for i in range(len(keys))]) == [Status.OK] * len(keys)
    n = 600  # about 8 MB of answers
    requests = b"".join(encode(ExistsRequest(keys=keys, lease_ttl_ms=0), 1000 + i) for i in range(n))
    sock = rawwire.connect(node.address, rcvbuf=4096, timeout_s=20.0)
    sender = threading.Thread(target=sock.sendall, args=(requests,), daemon=True)
    try:
        sender.start()
        time.sleep(1.0)
        answers = [rawwire.read_frame(sock) for _ in range(n)]
        sender.join(5)
    finally:
        sock.close()
    assert [h.request_id for h, _, _ in answers] == [1000 + i for i in range(n)]
    want_lengths = [i + 1 for i in range(len(keys))]
    for _, reply, _ in answers:
        assert isinstance(reply, ExistsResponse)
        assert list(reply.statuses) == [Status.OK] * len(keys) and list(reply.lengths) == want_lengths
