"""MemKV node throughput from many client processes, against raw loopback TCP with as many streams.

    .venv/bin/python benchmarks/node_scale.py             # 1, 4, 16 and 64 client processes
    .venv/bin/python benchmarks/node_scale.py --quick     # seconds: 1 and 4 clients, small values

Starts its own ``memkv node`` and, for each client count N, N client processes (each with its own
``NodeClient``) and a raw TCP server process. Each round measures four paths, interleaved so a
drifting machine affects all alike, each as aggregate GB/s (1e9 bytes/s): every client moves
whole batches until ``--seconds`` have passed, and the bytes of all clients are divided by the
time from the first client's start to the last one's finish (``perf_counter``, on Linux the
system-wide monotonic clock), so a batch that runs past the window counts with its time. A window, not a fixed
amount of work: with a fixed amount, 64 clients each moving one or two batches measured mostly
when the last of 64 processes got its turn on the CPUs, not throughput. Each client's keys hold ``--total`` / N bytes (PUTs overwrite them, GETs read them
again), so the node's memory does not grow with the window:

- raw in / raw out: each client process pushes the same bytes over one plain TCP stream to the
  raw server (a plain Python server, a thread per stream, ``sendall``/``recv_into``), and pulls
  them back, in the same batches and round trips as the node's path: the server acknowledges
  each batch it received, as the node answers each PUT, and the client asks for each batch it
  pulls, as it sends each GET;
- PUT / GET: each client process PUTs its values in batches to the node, then GETs them back
  into its buffers (bytes verified once per client, after the first round).

Then the node's thread count and RSS (``/proc/PID/status``) with no connections and with
``--conns`` authenticated connections held open by a few helper processes. It prints medians and
ratios (each the median over rounds of node / raw in the same round) in a table and asserts
nothing about speed. The issue's targets: PUT and GET at 16 and 64
clients at least 80% of raw, and threads flat in the number of connections.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import select
import socket
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path

from lmcache_memkv.client import NodeClient
from lmcache_memkv.client.connection import Connection
from lmcache_memkv.node.launcher import NodeProcess
from lmcache_memkv.sizes import format_size, parse_size
from lmcache_memkv.transport.tcp import await_queued, poll_queued, send_views

_CTX = mp.get_context("fork")  # 64 clients: forking this process is far quicker than 64 fresh interpreters
_SETUP = struct.Struct("!QQ")  # value size, values per batch: a raw stream's parameters


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("raw peer closed")
        got += n


def _buffers(value_size: int, n: int, seed: int) -> list[bytearray]:
    rnd = os.urandom(64)
    return [bytearray((rnd + bytes([seed & 0xFF, i & 0xFF])) * (value_size // 66 + 1))[:value_size] for i in range(n)]


# ----------------------------------------------------------------------------- raw server


def _read_value(sock: socket.socket, view: memoryview, poller: select.poll) -> None:
    """Read as the node reads a PUT value: non-blocking, and when the socket runs dry, one sleep
    until the rest (up to 1 MiB) is queued, not one wake-up per segment."""
    got, total = 0, len(view)
    while got < total:
        try:
            n = sock.recv_into(view[got:], total - got)
        except BlockingIOError:
            poll_queued(sock, poller, total - got, None)
            continue
        if n == 0:
            raise ConnectionError("raw peer closed")
        got += n


def _raw_stream(sock: socket.socket) -> None:
    """One stream of the raw server: b"S" receive a batch of values then ack (a PUT's round trip),
    b"R" send a batch of values (a GET's). It reads and writes as the node does (the same wait
    for a value's bytes, one gathered send per batch), so the baseline is no weaker than the node."""
    with sock:
        head = bytearray(_SETUP.size)
        _recv_exactly(sock, memoryview(head))
        value_size, batch = _SETUP.unpack(head)
        bufs = [memoryview(b) for b in _buffers(value_size, min(batch, 8), 7)]
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        cmd = memoryview(bytearray(1))
        while True:
            sock.setblocking(False)  # send_views leaves it blocking
            try:
                _read_value(sock, cmd, poller)
            except ConnectionError:
                return
            if cmd[0] == ord("S"):
                for i in range(batch):
                    _read_value(sock, bufs[i % len(bufs)], poller)
                send_views(sock, [b"A"], None)
            elif cmd[0] == ord("R"):
                send_views(sock, [bufs[i % len(bufs)] for i in range(batch)], None)
            else:
                return


def _raw_server(listener: socket.socket) -> None:
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=_raw_stream, args=(sock,), daemon=True).start()


# ----------------------------------------------------------------------------- client process


def _client(index: int, pipe: Pipe, node: str, raw_port: int, value_size: int, batch: int, batches: int) -> None:
    """One client process: waits for a command and a window in seconds, moves batches until the
    window has passed (at least one), reports (bytes moved, start, finish)."""
    raw = socket.create_connection(("127.0.0.1", raw_port))
    raw.sendall(_SETUP.pack(value_size, batch))
    client = NodeClient(node, timeout_s=300)
    keys = [[f"scale/{index}/{b}/{i}".encode() for i in range(batch)] for b in range(batches)]
    srcs = [_buffers(value_size, batch, index) for _ in range(batches)]  # other bytes in every batch
    dst = [bytearray(value_size) for _ in range(batch)]
    dst_views = [memoryview(b) for b in dst]
    expect = [value_size] * batch

    def raw_in(b: int) -> None:  # a round trip per batch, as a PUT: one gathered send, as the node client
        send_views(raw, [b"S", *srcs[b]], None)
        if raw.recv(1) != b"A":
            raise ConnectionError("raw server did not acknowledge")

    def raw_out(b: int) -> None:  # a round trip per batch, as a GET: the node client's first wait too
        raw.sendall(b"R")
        await_queued(raw, value_size * batch, None)
        for view in dst_views:
            _recv_exactly(raw, view)

    def put(b: int) -> None:
        ks = keys[b]
        statuses = client.put(ks, srcs[b])
        if any(statuses):  # Status.OK is 0
            raise RuntimeError(f"client {index}: PUT failed: {statuses}")

    def get(b: int) -> None:
        if client.get_into(keys[b], dst) != expect:
            raise RuntimeError(f"client {index}: GET missed values")

    paths = {"raw_in": raw_in, "raw_out": raw_out, "put": put, "get": get}
    try:
        while True:
            cmd, seconds = pipe.recv()
            if cmd == "fill":  # every batch stored once, so a GET window finds whichever it reads
                for b in range(batches):
                    put(b)
                pipe.send((0, 0.0, 0.0))
                continue
            if cmd == "verify":
                for b in dst:
                    b[:] = bytes(value_size)
                for ks, want in zip(keys, srcs, strict=True):
                    client.get_into(ks, dst)
                    if dst != want:
                        raise RuntimeError(f"client {index}: GET returned other bytes than PUT stored")
                pipe.send((0, 0.0, 0.0))
                continue
            if cmd not in paths:
                return
            step, moved, i = paths[cmd], 0, 0
            started = time.perf_counter()
            end = started + seconds
            while True:  # whole batches, cycling through this client's keys
                step(i)
                i = (i + 1) % batches
                moved += value_size * batch
                if (now := time.perf_counter()) >= end:
                    break
            pipe.send((moved, started, now))
    except BaseException as exc:
        pipe.send(f"client {index}: {exc!r}")
    finally:
        client.close()
        raw.close()


class Clients:
    """N client processes that run each command together; ``run`` returns aggregate GB/s."""

    def __init__(self, n: int, node: str, raw_port: int, value_size: int, batch: int, batches: int) -> None:
        self.pipes: list[Pipe] = []
        self.procs: list[mp.process.BaseProcess] = []
        for i in range(n):
            mine, theirs = _CTX.Pipe()
            p = _CTX.Process(target=_client, args=(i, theirs, node, raw_port, value_size, batch, batches), daemon=True)
            p.start()
            theirs.close()
            self.pipes.append(mine)
            self.procs.append(p)

    def run(self, cmd: str, seconds: float = 0.0) -> float:
        """Every client runs ``cmd`` for ``seconds``: GB/s from the first start to the last finish."""
        for pipe in self.pipes:
            pipe.send((cmd, seconds))
        total, first, last = 0, float("inf"), 0.0
        for pipe in self.pipes:
            got = pipe.recv()
            if isinstance(got, str):
                raise RuntimeError(got)
            moved, started, finished = got
            total, first, last = total + moved, min(first, started), max(last, finished)
        return total / (last - first) / 1e9 if total else 0.0

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("quit", 0.0))
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


@dataclass
class Rates:
    raw_in: list[float] = field(default_factory=list)
    raw_out: list[float] = field(default_factory=list)
    put: list[float] = field(default_factory=list)
    get: list[float] = field(default_factory=list)

    def med(self, name: str) -> float:
        return statistics.median(getattr(self, name))

    def ratio(self, node: str, raw: str) -> float:
        """Median over rounds of node / raw in the same round: drift between rounds cancels."""
        return statistics.median(n / r for n, r in zip(getattr(self, node), getattr(self, raw), strict=True))


def measure(clients: Clients, rounds: int, warmup: int, seconds: float) -> Rates:
    rates = Rates()
    clients.run("fill")
    for r in range(warmup + rounds):
        sample = {name: clients.run(name, seconds) for name in ("raw_in", "put", "raw_out", "get")}
        if r == 0:
            clients.run("verify")  # every client checks its bytes once, outside the timed rounds
        if r >= warmup:
            for name, value in sample.items():
                getattr(rates, name).append(value)
    return rates


# ----------------------------------------------------------------------------- connections


def _proc_status(pid: int) -> tuple[int, int]:
    """(threads, RSS KiB) of a process."""
    threads = rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return threads, rss


def _holder(node: str, n: int, pipe: Pipe) -> None:
    """Opens ``n`` authenticated connections, reports, holds them until told to let go."""
    _raise_nofile()
    conns: list[Connection] = []
    try:
        for _ in range(n):
            conns.append(Connection(node, None, 30.0))
        pipe.send(len(conns))
        pipe.recv()
    except BaseException as exc:
        pipe.send(f"holder: {exc!r}")
    finally:
        for c in conns:
            c.close()


def connection_cost(total: int, helpers: int) -> list[tuple[int, int, int]]:
    """(connections, node threads, node RSS KiB) with none and with ``total`` open."""
    out: list[tuple[int, int, int]] = []
    node = NodeProcess.start(capacity="64MiB", metrics=False, args=["--log-level", "warning"])
    pipes: list[Pipe] = []
    procs: list[mp.process.BaseProcess] = []
    try:
        with NodeClient(node.data) as c:
            c.ping()  # the node has served once: lazily created state exists in both samples
        time.sleep(0.5)
        out.append((0, *_proc_status(node.pid)))
        share = [total // helpers + (1 if i < total % helpers else 0) for i in range(helpers)]
        for n in share:
            mine, theirs = _CTX.Pipe()
            p = _CTX.Process(target=_holder, args=(node.data, n, theirs), daemon=True)
            p.start()
            theirs.close()
            pipes.append(mine)
            procs.append(p)
        opened = 0
        for pipe in pipes:
            got = pipe.recv()
            if isinstance(got, str):
                raise RuntimeError(got)
            opened += got
        with NodeClient(node.data) as c:  # and the node still serves
            value = os.urandom(1 << 20)
            c.put([b"k"], [value])
            back = bytearray(len(value))
            if c.get_into([b"k"], [back]) != [len(value)] or back != value:
                raise RuntimeError("the node did not serve with many connections open")
        time.sleep(0.5)
        out.append((opened, *_proc_status(node.pid)))
    finally:
        for pipe in pipes:
            try:
                pipe.send("done")
            except OSError:
                pass
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        node.stop()
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,4,16,64", help="client process counts (default 1,4,16,64)")
    p.add_argument("--value-size", default="1MiB", help="bytes per value (default 1MiB)")
    p.add_argument("--batch", type=int, default=8, help="values per PUT/GET request (default 8)")
    p.add_argument("--seconds", type=float, default=1.0, help="each path's window per round: every client moves batches this long (default 1.0)")
    p.add_argument("--total", default="256MiB", help="bytes the clients' keys hold, all clients together (at least a batch each; default 256MiB)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per client count; medians are reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--conns", type=int, default=2000, help="connections held open for the thread/RSS figures (default 2000)")
    p.add_argument("--helpers", type=int, default=4, help="processes that hold those connections (default 4)")
    p.add_argument("--workers", type=int, default=None, help="the node's --workers (default: the node's default)")
    p.add_argument("--quick", action="store_true", help="seconds, not minutes: 1 and 4 clients, 64KiB values, 200 connections")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.value_size, args.batch, args.total = "1,4", "64KiB", 4, "4MiB"
        args.rounds, args.warmup, args.conns, args.helpers, args.seconds = 2, 1, 200, 2, 0.1
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    value_size, total = parse_size(args.value_size), parse_size(args.total)
    if not counts or min(counts) <= 0 or value_size <= 0 or args.batch <= 0 or args.rounds <= 0 or args.conns < 0 or args.seconds <= 0:
        p.error("counts and sizes must be positive")
    _raise_nofile()

    # Each client's keys hold total/N bytes, in whole batches (at least one).
    per_client = {n: max(1, total // (n * value_size * args.batch)) for n in counts}
    resident = max(n * per_client[n] * args.batch * value_size for n in counts)
    capacity = resident + 2 * max(counts) * args.batch * value_size + (64 << 20)  # room for overwrites
    # All clients connect at once from one address: let their handshakes through the per-host budget.
    node_args = ["--log-level", "warning", "--max-unauth-per-host", "256", "--max-unauth-connections", "256"]
    node_args += ["--workers", str(args.workers)] if args.workers else []
    node = NodeProcess.start(capacity=str(capacity), metrics=False, args=node_args)
    listener = socket.create_server(("127.0.0.1", 0), backlog=256)
    raw_port = int(listener.getsockname()[1])
    raw_server = _CTX.Process(target=_raw_server, args=(listener,), daemon=True)
    raw_server.start()
    listener.close()  # the server process has its own descriptor
    results: dict[int, Rates] = {}
    try:
        for n in counts:
            clients = Clients(n, node.data, raw_port, value_size, args.batch, per_client[n])
            try:
                results[n] = measure(clients, args.rounds, args.warmup, args.seconds)
            finally:
                clients.close()
    finally:
        raw_server.kill()
        raw_server.join(10)
        node.stop()
    conn_rows = connection_cost(args.conns, max(1, args.helpers)) if args.conns else []

    print(
        f"memkv node scale: loopback, {format_size(value_size)} values, batches of {args.batch}, keys holding "
        f"about {format_size(total)} over all clients, a {args.seconds:g} s window per path and round, "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up, {os.cpu_count()} CPUs"
    )
    for n, r in results.items():
        print(f"put@{n}: {r.med('put'):.2f} GB/s = {r.ratio('put', 'raw_in'):.0%} of raw loopback ({r.med('raw_in'):.2f} GB/s)")
        print(f"get@{n}: {r.med('get'):.2f} GB/s = {r.ratio('get', 'raw_out'):.0%} of raw loopback ({r.med('raw_out'):.2f} GB/s)")
    print()
    print(f"{'clients':>7} {'raw in':>8} {'PUT':>8} {'PUT/raw':>8} {'raw out':>8} {'GET':>8} {'GET/raw':>8}")
    for n, r in results.items():
        print(
            f"{n:>7} {r.med('raw_in'):8.2f} {r.med('put'):8.2f} {r.ratio('put', 'raw_in'):8.0%} "
            f"{r.med('raw_out'):8.2f} {r.med('get'):8.2f} {r.ratio('get', 'raw_out'):8.0%}"
        )
    print("(GB/s: medians over rounds; ratios: medians of node / raw within each round)")
    if conn_rows:
        print()
        print(f"{'connections':>11} {'threads':>8} {'RSS':>10}   (the node, from /proc/PID/status)")
        for conns, threads, rss in conn_rows:
            print(f"{conns:>11} {threads:>8} {format_size(rss * 1024):>10}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
