"""An overwrite never tears a concurrent read: every read is entirely the old or the new value."""

from __future__ import annotations

import threading
import time

import rawwire
from nodeproc import NodeFactory, NodeProcess

from lmcache_memkv.wire.constants import Status
from lmcache_memkv.wire.messages import GetRequest, GetResponse, encode

# Larger than the node's socket send buffer, so the node copies out of the arena for as long
# as the transfer lasts (a smaller value leaves the arena in one sendmsg).
SIZE = 16 << 20
A = bytes([0xAA]) * (SIZE // 2) + bytes([0x0F]) * (SIZE // 2)  # full patterns: a half-and-half mix
B = bytes([0x55]) * (SIZE // 2) + bytes([0xF0]) * (SIZE // 2)  # of A and B is neither A nor B


def slow_get(node: NodeProcess, rid: int) -> bytes:
    """GET over a raw socket with a tiny receive window, read in sips: the node's send of this
    value spans many overwrites, which is where an early-freed extent would be refilled."""
    raw = rawwire.connect(node.address, timeout_s=20, rcvbuf=64 << 10)
    try:
        raw.sendall(encode(GetRequest(keys=[b"torn"], capacities=[SIZE]), rid))
        _header, msg, _ = rawwire.read_frame_head(raw)
        assert isinstance(msg, GetResponse) and msg.lengths == [SIZE], msg
        out = bytearray()
        while len(out) < SIZE:
            out += raw.recv(min(256 << 10, SIZE - len(out)))
            time.sleep(0.002)
        return bytes(out)
    finally:
        raw.close()


def test_concurrent_overwrite_and_reads_never_tear(node_factory: NodeFactory) -> None:
    node = node_factory(capacity="96MiB")
    stop = threading.Event()
    seen = {"A": 0, "B": 0}
    bad: list[str] = []
    writes = 0
    lock = threading.Lock()

    def check(buf: bytes | bytearray, n: list[int | None] | None = None) -> None:
        which = "A" if buf == A else "B" if buf == B else None
        if (n is not None and n != [SIZE]) or which is None:
            bad.append(f"torn or short read: {n}, first bytes {bytes(buf[:4]).hex()}")
            stop.set()
            return
        with lock:
            seen[which] += 1

    with node.client(timeout_s=20) as c:
        assert c.put([b"torn"], [A]) == [Status.OK]

        def writer() -> None:
            nonlocal writes
            while not stop.is_set():
                for v in (B, A):
                    if c.put([b"torn"], [v]) != [Status.OK]:
                        bad.append("put failed")
                    writes += 1
                    if writes % 3 == 0:
                        # Shift where the next value lands, so a freed-too-early extent would be
                        # refilled with the *other* pattern and a tear would show.
                        c.put([b"side"], [bytes(writes % 5 * 300_000 + 1)])

        def reader() -> None:
            buf = bytearray(SIZE)
            while not stop.is_set():
                check(buf, c.get_into([b"torn"], [buf]))

        def slow_reader() -> None:
            rid = 1
            while not stop.is_set():
                check(slow_get(node, rid))
                rid += 1

        threads = [threading.Thread(target=f) for f in (writer, reader, reader, slow_reader)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(30)
    assert bad == []
    assert writes >= 10 and seen["A"] > 0 and seen["B"] > 0, (writes, seen)
