"""Large TCP transfers take turns at the node's transfer slots: first come, first served, a wait
for a slot ends at the request's deadline, and a peer that stalls mid-transfer gives its turn up
(and gets it back once it moves again), so it cannot hold up anyone else's transfers."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rawwire
from nodeproc import NodeFactory

from lmcache_memkv.client import NodeClient
from lmcache_memkv.errors import ServerError
from lmcache_memkv.node.config import NodeConfig
from lmcache_memkv.node.server import NodeServer
from lmcache_memkv.node.slots import TransferSlots, default_transfers
from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import ErrorCode, Status
from lmcache_memkv.wire.messages import GetRequest, GetResponse, PutRequest, PutResponse, encode

BIG = 16 << 20  # far more than a loopback socket pair buffers: a peer that stops reading stalls the send


def _until(cond: object, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_waiters_get_the_slot_in_the_order_they_came() -> None:
    slots = TransferSlots(1)
    assert slots.acquire(time.monotonic() + 1)
    order: list[int] = []

    def take(i: int) -> None:
        assert slots.acquire(time.monotonic() + 10)
        order.append(i)
        slots.release()

    threads = []
    for i in range(5):
        t = threading.Thread(target=take, args=(i,))
        t.start()
        threads.append(t)
        _until(lambda i=i: slots.waiting == i + 1)  # queued behind the ones before it
    slots.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]
    assert slots.acquire(time.monotonic()) and not slots.acquire(time.monotonic())  # one slot, back and not doubled


def test_a_wait_that_reaches_its_deadline_takes_no_slot() -> None:
    slots = TransferSlots(1)
    assert slots.acquire(time.monotonic() + 1)
    t0 = time.monotonic()
    assert not slots.acquire(t0 + 0.1)
    assert 0.1 <= time.monotonic() - t0 < 2.0
    assert slots.waiting == 0
    slots.release()
    assert slots.acquire(time.monotonic())


def _hand_over_once() -> None:
    slots = TransferSlots(1)
    assert slots.acquire(time.monotonic() + 1)
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(slots.acquire(time.monotonic() + 5)))
    t.start()
    _until(lambda: slots.waiting == 1)
    slots.release()
    assert not slots.acquire(time.monotonic()), "a newcomer barged past the queued waiter"
    t.join(5)
    assert got == [True]
    slots.release()


def test_a_released_slot_goes_to_the_waiter_not_to_a_newcomer() -> None:
    for _ in range(20):  # a barging semaphore lets the newcomer in most of the time, not always
        _hand_over_once()


def test_a_deadline_beyond_what_a_lock_can_wait_still_gets_the_slot() -> None:
    # threading's waits stop at TIMEOUT_MAX (about 292 years): a longer deadline must not make
    # the wait raise after queueing (the slot then handed to a dead waiter would be lost).
    slots = TransferSlots(1)
    assert slots.acquire(time.monotonic() + 1)
    got: list[object] = []

    def wait() -> None:
        try:
            got.append(slots.acquire(time.monotonic() + threading.TIMEOUT_MAX * 10))
        except BaseException as exc:
            got.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    _until(lambda: slots.waiting == 1)
    slots.release()
    t.join(5)
    assert got == [True]
    slots.release()
    assert slots.acquire(time.monotonic())


def test_many_threads_with_short_deadlines_never_exceed_the_count_nor_lose_a_slot() -> None:
    # Waits that time out just as a slot is handed to them must pass it on, not drop or double it.
    slots = TransferSlots(3)
    lock = threading.Lock()
    holding = [0, 0]  # now, most ever
    rng = random.Random(7)
    deadlines = [[rng.uniform(0, 0.002) for _ in range(300)] for _ in range(8)]

    def run(mine: list[float]) -> None:
        for d in mine:
            if slots.acquire(time.monotonic() + d):
                with lock:
                    holding[0] += 1
                    holding[1] = max(holding[1], holding[0])
                time.sleep(0.0001)
                with lock:
                    holding[0] -= 1
                slots.release()

    threads = [threading.Thread(target=run, args=(d,)) for d in deadlines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert holding[1] <= 3
    assert slots.waiting == 0
    assert all(slots.acquire(time.monotonic()) for _ in range(3)) and not slots.acquire(time.monotonic())


def test_transfers_setting_is_checked_and_defaults_to_the_cpus() -> None:
    with pytest.raises(ValueError, match=r"--transfers must be in 0\.\.1024"):
        NodeConfig(listen="127.0.0.1:0", capacity=1 << 20, transfers=-1)
    with pytest.raises(ValueError, match="at least 1"):
        TransferSlots(0)
    assert default_transfers("/nonexistent") == max(2, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize(
    ("cpus", "cpu_max", "expected"),
    [
        (16, "max 100000\n", 16),
        (16, "150000 100000\n", 2),
        (16, "100000 100000\n", 2),
        (16, "250000 100000\n", 3),
        (16, "garbage\n", 16),
        (16, "100000 0\n", 16),
        (1, "max 100000\n", 2),
    ],
)
def test_default_transfers_follow_a_container_cpu_limit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpus: int, cpu_max: str, expected: int
) -> None:
    """One slot per CPU the node may use (a container's CPU quota caps its affinity; a quota file
    that does not parse is ignored), at least two."""
    monkeypatch.setattr("lmcache_memkv.cpus.os.sched_getaffinity", lambda pid: set(range(cpus)))
    f = tmp_path / "cpu.max"
    f.write_text(cpu_max)
    assert default_transfers(str(f)) == expected


def test_transfers_from_the_command_line_and_the_settings_file(node_factory: NodeFactory, tmp_path: Path) -> None:
    assert "3 transfers at once" in node_factory(capacity="8MiB", args=["--transfers", "3"]).log()
    config = tmp_path / "node.yaml"
    config.write_text("transfers: 5\n")
    assert "5 transfers at once" in node_factory(capacity="8MiB", args=["--config", str(config)]).log()


def test_a_reader_that_stops_reading_does_not_hold_up_other_transfers(node_factory: NodeFactory) -> None:
    # One slot, taken by a GET whose reader stops: the others' transfers go ahead at once (not
    # after its 30 s deadline), and the stalled one completes, every byte right, once it reads.
    node = node_factory(capacity="128MiB", args=["--transfers", "1", "--frame-timeout", "30"])
    big, other = os.urandom(BIG), os.urandom(BIG)
    with node.client() as c:
        assert c.put([b"big"], [big]) == [Status.OK]
    stuck = rawwire.connect(node.address, rcvbuf=4096, timeout_s=30)
    try:
        stuck.sendall(encode(GetRequest(keys=[b"big"], capacities=[BIG]), 7))
        time.sleep(0.3)  # its transfer has begun and stalled on the full socket
        t0 = time.monotonic()
        with NodeClient(node.data, timeout_s=5.0) as c:
            back = bytearray(BIG)
            assert c.get_into([b"big"], [back]) == [BIG] and back == big
            assert c.put([b"other"], [other]) == [Status.OK]
        assert time.monotonic() - t0 < 4.0
        header, reply, n = rawwire.read_frame_head(stuck)  # now it reads: the node queues again and finishes
        assert header.request_id == 7 and isinstance(reply, GetResponse) and list(reply.statuses) == [Status.OK]
        assert n == BIG and rawwire.recv_all(stuck, n) == big
    finally:
        stuck.close()


def test_a_writer_that_stops_mid_value_does_not_hold_up_other_transfers(node_factory: NodeFactory) -> None:
    node = node_factory(capacity="128MiB", args=["--transfers", "1", "--frame-timeout", "30"])
    value, other = os.urandom(BIG), os.urandom(BIG)
    stuck = rawwire.connect(node.address, timeout_s=30)
    try:
        stuck.sendall(encode(PutRequest(keys=[b"slow"], sizes=[BIG], versions=CLOCK.next(1)), 9) + value[: 2 << 20])
        time.sleep(0.3)  # the node has read what came and waits for the rest
        t0 = time.monotonic()
        with NodeClient(node.data, timeout_s=5.0) as c:
            assert c.put([b"other"], [other]) == [Status.OK]
            back = bytearray(BIG)
            assert c.get_into([b"other"], [back]) == [BIG] and back == other
        assert time.monotonic() - t0 < 4.0
        stuck.sendall(value[2 << 20 :])
        header, reply, _ = rawwire.read_frame(stuck)
        assert header.request_id == 9 and isinstance(reply, PutResponse) and list(reply.statuses) == [Status.OK]
        with NodeClient(node.data, timeout_s=5.0) as c:
            back = bytearray(BIG)
            assert c.get_into([b"slow"], [back]) == [BIG] and back == value
    finally:
        stuck.close()


def test_small_transfers_take_no_slot_and_a_large_one_that_gets_none_in_time_is_told_why() -> None:
    server = NodeServer(NodeConfig(listen="127.0.0.1:0", capacity=64 << 20, transfers=1, frame_timeout_s=0.5))
    server.start()
    try:
        big = os.urandom(1 << 20)
        with NodeClient(server.endpoint, timeout_s=5.0) as c:
            assert c.put([b"big"], [big]) == [Status.OK]
            assert server.slots.acquire(time.monotonic() + 1)  # every slot taken, by no one who will let go
            try:
                back = bytearray(1000)
                assert c.put([b"small"], [b"s" * 1000]) == [Status.OK]
                assert c.get_into([b"small"], [back]) == [1000] and back == b"s" * 1000
                failed: list[BaseException] = []

                def large_get() -> None:
                    try:
                        c.get_into([b"big"], [bytearray(len(big))])
                    except BaseException as exc:
                        failed.append(exc)

                t = threading.Thread(target=large_get)
                t.start()
                _until(lambda: server.metrics.registry.get_sample_value(
                    "memkv_node_transfers_waiting", {"node": server.config.node_id}) == 1)  # operators see it queue
                t.join(10)
                assert len(failed) == 1 and isinstance(failed[0], ServerError), failed
                assert "timed out waiting for a transfer slot" in str(failed[0]) and failed[0].code == ErrorCode.TIMEOUT
                assert server.slots.waiting == 0
            finally:
                server.slots.release()
        with NodeClient(server.endpoint, timeout_s=5.0) as c:
            back = bytearray(len(big))
            assert c.get_into([b"big"], [back]) == [len(big)] and back == big
    finally:
        server.stop(0)


@pytest.fixture
def one_slot() -> Iterator[NodeServer]:
    server = NodeServer(NodeConfig(listen="127.0.0.1:0", capacity=128 << 20, transfers=1, frame_timeout_s=30))
    server.start()
    try:
        yield server
    finally:
        server.stop(0)


def _all_free(slots: TransferSlots) -> bool:
    got = sum(slots.acquire(time.monotonic()) for _ in range(slots.count))
    for _ in range(got):
        slots.release()
    return got == slots.count


def test_a_large_put_takes_a_slot(one_slot: NodeServer) -> None:
    with NodeClient(one_slot.endpoint, timeout_s=5.0) as c:
        assert one_slot.slots.acquire(time.monotonic() + 1)
        try:
            one_slot.config.frame_timeout_s = 0.5  # read per request
            with pytest.raises(ServerError, match="timed out waiting for a transfer slot") as caught:
                c.put([b"big"], [os.urandom(1 << 20)])
            assert caught.value.code == ErrorCode.TIMEOUT
        finally:
            one_slot.slots.release()


def test_a_transfer_that_gave_its_slot_up_queues_for_it_again(one_slot: NodeServer) -> None:
    value = os.urandom(BIG)
    with NodeClient(one_slot.endpoint, timeout_s=5.0) as c:
        assert c.put([b"big"], [value]) == [Status.OK]
    stuck = rawwire.connect(one_slot.address, rcvbuf=4096, timeout_s=30)
    try:
        stuck.sendall(encode(GetRequest(keys=[b"big"], capacities=[BIG]), 7))
        time.sleep(0.3)  # it sent what fits, waited its quantum, gave the slot up
        assert one_slot.slots.acquire(time.monotonic() + 1)  # now the test holds the only slot
        try:
            _, reply, n = rawwire.read_frame_head(stuck)
            assert isinstance(reply, GetResponse) and n == BIG
            got = bytearray()
            stuck.settimeout(0.2)
            end = time.monotonic() + 1.0
            while time.monotonic() < end and len(got) < n:
                try:
                    got += stuck.recv(1 << 20)
                except TimeoutError:
                    pass
            assert len(got) < n // 2, f"{len(got)} of {n} bytes came while the only slot was taken"
            assert one_slot.slots.waiting == 1
        finally:
            one_slot.slots.release()
        stuck.settimeout(10)
        got += rawwire.recv_all(stuck, n - len(got))
        assert got == value
    finally:
        stuck.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_transfers_whose_peers_reset_give_their_slots_back(one_slot: NodeServer) -> None:
    with NodeClient(one_slot.endpoint, timeout_s=5.0) as c:
        assert c.put([b"big"], [os.urandom(BIG)]) == [Status.OK]
    for i in range(3):
        s = rawwire.connect(one_slot.address, rcvbuf=4096, timeout_s=5)
        s.sendall(encode(GetRequest(keys=[b"big"], capacities=[BIG]), 1))
        rawwire.read_frame_head(s)
        s.recv(4096)
        _reset(s)
        s = rawwire.connect(one_slot.address, timeout_s=5)
        s.sendall(encode(PutRequest(keys=[b"p%d" % i], sizes=[BIG], versions=CLOCK.next(1)), 1) + b"x" * (2 << 20))
        time.sleep(0.1)
        _reset(s)
    _until(lambda: _all_free(one_slot.slots))


def test_a_peer_that_hung_up_does_not_queue_for_a_slot(one_slot: NodeServer) -> None:
    # Its GET fails at once (the connection is gone), not after waiting behind a held slot until
    # its deadline.
    with NodeClient(one_slot.endpoint, timeout_s=5.0) as c:
        assert c.put([b"big"], [os.urandom(1 << 20)]) == [Status.OK]
    assert one_slot.slots.acquire(time.monotonic() + 1)
    try:
        s = rawwire.connect(one_slot.address, timeout_s=5)
        s.sendall(encode(GetRequest(keys=[b"big"], capacities=[1 << 20]), 1))
        _reset(s)
        time.sleep(0.5)
        assert one_slot.slots.waiting == 0
    finally:
        one_slot.slots.release()


def test_a_trickling_peer_earns_no_turns(one_slot: NodeServer) -> None:
    # A batch of a 1 MiB value and then one-byte values, a byte every 5 ms (about 200 B/s): it
    # must not get a turn per byte and hold the slot idle each time.
    held = [0.0]
    acquire, release = one_slot.slots.acquire, one_slot.slots.release
    since = threading.local()

    def timed_acquire(deadline: float) -> bool:
        ok = acquire(deadline)
        if ok:
            since.t = time.monotonic()
        return ok

    def timed_release() -> None:
        held[0] += time.monotonic() - since.t
        release()

    one_slot.slots.acquire, one_slot.slots.release = timed_acquire, timed_release  # type: ignore[method-assign]
    n = 400
    s = rawwire.connect(one_slot.address, timeout_s=10)
    try:
        head = encode(PutRequest(keys=[b"t%d" % j for j in range(n)], sizes=[1 << 20] + [1] * (n - 1), versions=CLOCK.next(n)), 1)
        s.sendall(head + b"x" * (1 << 20))
        time.sleep(0.1)
        held[0] = 0.0
        t0 = time.monotonic()
        for _ in range(200):
            s.send(b"y")
            time.sleep(0.005)
        share = held[0] / (time.monotonic() - t0)
        assert share < 0.3, f"a peer sending about 200 B/s held the only transfer slot {share:.0%} of the time"
    finally:
        s.close()
