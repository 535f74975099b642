"""MemKV node data-plane throughput against raw loopback TCP, measured in one run.

    .venv/bin/python benchmarks/node_throughput.py            # 1 MiB values, batches of 32

Starts its own ``memkv node``, then measures four paths with the same bytes per round:

- raw: a plain TCP socket pair between two processes (default socket options) pushing the
  same bytes with ``sendall``/``recv_into``, value by value, from and into as many distinct
  buffers as the client uses (one batch), in both directions;
- PUT: ``NodeClient.put`` of batches into the node;
- GET: ``NodeClient.get_into`` of the same batches into caller buffers.

Rounds interleave the four paths (raw in, raw out, PUT, GET, raw in, ...), so a machine whose
loopback speed drifts over seconds (shared VMs do) affects all of them alike. After a warm-up
it prints the median GB/s (1e9 bytes/s) of each, PUT and GET as a fraction of raw in the same
direction, a table, and the node's CPU seconds (user + system, /proc, all its threads) per GB
moved by PUT and by GET over the timed rounds. It asserts nothing about speed (the smoke test
only runs it).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmcache_memkv.client import NodeClient
from lmcache_memkv.node.launcher import NodeProcess
from lmcache_memkv.sizes import format_size, parse_size

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, all its threads (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name may hold spaces; fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: fields 14 and 15


# ----------------------------------------------------------------------------- raw loopback


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("raw peer closed")
        got += n


def _buffers(value_size: int, n: int) -> list[bytearray]:
    return [bytearray(os.urandom(value_size)) for _ in range(n)]


def _raw_peer(port: int, value_size: int, count: int, batch: int) -> None:
    """The other process of the raw pair: sends on b"S", receives (then acks) on b"R"."""
    sock = socket.create_connection(("127.0.0.1", port))
    src = _buffers(value_size, batch)
    dst = [memoryview(b) for b in _buffers(value_size, batch)]
    try:
        while True:
            cmd = sock.recv(1)
            if cmd == b"S":
                for i in range(count):
                    sock.sendall(src[i % batch])
            elif cmd == b"R":
                for i in range(count):
                    _recv_exactly(sock, dst[i % batch])
                sock.sendall(b"A")
            else:
                return
    finally:
        sock.close()


class RawPair:
    """A plain TCP connection to a peer process; both ends use default socket options.

    Each side cycles through ``batch`` distinct buffers, as the client does with its values
    and destination buffers: one reused buffer would stay in the CPU cache and make "raw"
    a measure of cache residency rather than of the socket path.
    """

    def __init__(self, value_size: int, count: int, batch: int) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        self.peer = mp.get_context("spawn").Process(
            target=_raw_peer, args=(port, value_size, count, batch), daemon=True
        )
        self.peer.start()
        listener.settimeout(30)
        self.sock, _ = listener.accept()
        listener.close()
        self.sock.settimeout(None)
        self.src = _buffers(value_size, batch)
        self.dst = [memoryview(b) for b in _buffers(value_size, batch)]
        self.batch = batch
        self.count = count
        self.total = value_size * count

    def inbound(self) -> float:
        """GB/s from the peer to us (the PUT direction)."""
        started = time.perf_counter()
        self.sock.sendall(b"S")
        for i in range(self.count):
            _recv_exactly(self.sock, self.dst[i % self.batch])
        return self.total / (time.perf_counter() - started) / 1e9

    def outbound(self) -> float:
        """GB/s from us to the peer (the GET direction), until the peer has it all."""
        started = time.perf_counter()
        self.sock.sendall(b"R")
        for i in range(self.count):
            self.sock.sendall(self.src[i % self.batch])
        if self.sock.recv(1) != b"A":
            raise ConnectionError("raw peer did not acknowledge")
        return self.total / (time.perf_counter() - started) / 1e9

    def close(self) -> None:
        try:
            self.sock.sendall(b"Q")
        finally:
            self.sock.close()
            self.peer.join(10)
            if self.peer.is_alive():
                self.peer.kill()


# ----------------------------------------------------------------------------- node


class NodeLoad:
    """PUT and GET rounds of ``batches`` batches through one ``NodeClient``."""

    def __init__(self, endpoint: str, value_size: int, batch: int, batches: int) -> None:
        self.client = NodeClient(endpoint, timeout_s=120)
        self.keys = [[f"bench/{b}/{i}".encode() for i in range(batch)] for b in range(batches)]
        self.values = _buffers(value_size, batch)
        self.dsts = [bytearray(value_size) for _ in range(batch)]
        self.expect = [value_size] * batch
        self.total = value_size * batch * batches

    def put(self) -> float:
        started = time.perf_counter()
        for ks in self.keys:
            statuses = self.client.put(ks, self.values)
            if any(statuses):  # Status.OK is 0
                raise RuntimeError(f"PUT failed: {statuses}")
        return self.total / (time.perf_counter() - started) / 1e9

    def get(self) -> float:
        started = time.perf_counter()
        for ks in self.keys:
            lengths = self.client.get_into(ks, self.dsts)
            if lengths != self.expect:
                raise RuntimeError(f"GET missed values: {lengths}")
        return self.total / (time.perf_counter() - started) / 1e9

    def verify(self) -> None:
        if self.dsts != self.values:
            raise RuntimeError("GET returned different bytes than PUT stored")


@dataclass
class Rates:
    raw_in: list[float] = field(default_factory=list)
    raw_out: list[float] = field(default_factory=list)
    put: list[float] = field(default_factory=list)
    get: list[float] = field(default_factory=list)
    put_cpu: float = 0.0  # the node's CPU seconds in the timed PUTs
    get_cpu: float = 0.0


def measure(raw: RawPair, load: NodeLoad, rounds: int, warmup: int, node_cpu: Callable[[], float | None] = lambda: 0.0) -> Rates:
    """Interleaved rounds: raw and node paths see the same machine, whatever else it is doing."""
    rates = Rates()
    for r in range(warmup + rounds):
        raw_in, raw_out = raw.inbound(), raw.outbound()
        c0 = node_cpu()
        put = load.put()
        c1 = node_cpu()
        get = load.get()
        c2 = node_cpu()
        if r == 0:
            load.verify()  # byte-exact once, outside the timed rounds
        if r >= warmup:
            for series, value in zip((rates.raw_in, rates.raw_out, rates.put, rates.get), (raw_in, raw_out, put, get), strict=True):
                series.append(value)
            if c0 is not None and c1 is not None and c2 is not None:
                rates.put_cpu += c1 - c0
                rates.get_cpu += c2 - c1
    return rates


# ----------------------------------------------------------------------------- report


def _row(name: str, rates: list[float], raw: list[float] | None) -> str:
    med = statistics.median(rates)
    ratio = f"{med / statistics.median(raw):7.0%}" if raw else "      -"
    return f"{name:<30} {med:8.2f} {min(rates):8.2f} {max(rates):8.2f} {ratio}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--value-size", default="1MiB", help="bytes per value (default 1MiB)")
    p.add_argument("--batch", type=int, default=32, help="values per PUT/GET request (default 32)")
    p.add_argument("--batches", type=int, default=8, help="batches per round (default 8)")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds; medians are reported (default 9)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    args = p.parse_args(argv)
    value_size = parse_size(args.value_size)
    if value_size <= 0 or args.batch <= 0 or args.batches <= 0 or args.rounds <= 0 or args.warmup < 0:
        p.error("sizes and counts must be positive")
    count = args.batch * args.batches
    total = value_size * count
    # Every key stays resident; an overwrite needs room for one more batch before the old one is freed.
    capacity = max(total + 2 * value_size * args.batch + (64 << 20), 64 << 20)

    node = NodeProcess.start(capacity=str(capacity), metrics=False, args=["--log-level", "warning"])
    raw: RawPair | None = None
    try:
        raw = RawPair(value_size, count, args.batch)
        pid = node.pid
        rates = measure(raw, NodeLoad(node.data, value_size, args.batch, args.batches), args.rounds, args.warmup, lambda: cpu_seconds(pid))
    finally:
        if raw is not None:
            raw.close()
        node.stop()

    put, get = statistics.median(rates.put), statistics.median(rates.get)
    raw_in, raw_out = statistics.median(rates.raw_in), statistics.median(rates.raw_out)
    print(
        f"memkv node throughput: loopback, {format_size(value_size)} values, batches of {args.batch}, "
        f"{format_size(total)} per round and path, {args.rounds} interleaved rounds after {args.warmup} warm-up, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"put: {put:.2f} GB/s = {put / raw_in:.0%} of raw loopback ({raw_in:.2f} GB/s)")
    print(f"get: {get:.2f} GB/s = {get / raw_out:.0%} of raw loopback ({raw_out:.2f} GB/s)")
    print()
    print(f"{'path':<30} {'median':>8} {'min':>8} {'max':>8} {'vs raw':>7}   (GB/s)")
    print(_row("raw TCP, client -> server", rates.raw_in, None))
    print(_row("raw TCP, server -> client", rates.raw_out, None))
    print(_row("PUT  client -> node", rates.put, rates.raw_in))
    print(_row("GET  node -> client", rates.get, rates.raw_out))
    moved = total * args.rounds / 1e9
    print()
    print(f"node CPU seconds per GB: PUT {rates.put_cpu / moved:.3f}, GET {rates.get_cpu / moved:.3f} "
          f"(user + system over the timed rounds; /proc ticks of {1 / _TICK * 1e3:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
