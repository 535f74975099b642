"""Membership traffic per node as the cluster grows, measured side by side in one run.

    .venv/bin/python benchmarks/gossip_traffic.py            # 4, 8 and 16 nodes
    .venv/bin/python benchmarks/gossip_traffic.py --quick    # 2 and 4 nodes, short windows

For each cluster size it starts that many ``memkv node`` processes on loopback (one seed, the
rest joining it), waits until every node lists every other ALIVE, lets the join gossip drain
(``--settle``), then reads ``memkv_gossip_bytes_total`` (serialised membership protobuf bytes:
Ping, PingReq, anti-entropy, Join, Leave; both as caller and as callee) from each node's
/metrics at the start and the end of a window (``--window``). It prints bytes per node per
second, sent and received, and each size's total relative to the smallest size. SWIM probes one
member per period and piggybacks a bounded number of records, so the goal is a flat line:
every ratio within 2x. It asserts nothing (the smoke test only runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from lmcache_memkv.control.channel import open_channel
from lmcache_memkv.control.convert import view_from_proto
from lmcache_memkv.control.response_auth import fresh_nonce
from lmcache_memkv.node.launcher import NodeProcess
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc

_SAMPLE = re.compile(r'^memkv_gossip_bytes_total\{[^}]*direction="(sent|received)"[^}]*\}\s+(\S+)$', re.M)


@dataclass
class Row:
    nodes: int
    sent: float  # bytes per node per second
    received: float
    converge_s: float

    @property
    def total(self) -> float:
        return self.sent + self.received


def gossip_bytes(node: NodeProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {"sent": 0.0, "received": 0.0}
    for direction, value in _SAMPLE.findall(text):
        out[direction] += float(value)
    return out


def alive_ids(endpoint: str) -> set[str]:
    channel = open_channel(endpoint, None)
    try:
        reply = cluster_pb2_grpc.ClusterStub(channel).MemberList(
            cluster_pb2.MemberListRequest(nonce=fresh_nonce()), timeout=2
        )
        return {m.node_id for m in view_from_proto(reply.view)[1] if str(m.state) == "ALIVE"}
    finally:
        channel.close()


def measure(n: int, interval_s: float, settle_s: float, window_s: float) -> Row:
    args = ["--heartbeat-interval", str(interval_s), "--suspect-after", str(3 * interval_s), "--dead-after", str(6 * interval_s)]
    nodes: list[NodeProcess] = []
    try:
        for i in range(n):
            seed = ["--seed", str(nodes[0].control)] if nodes else []
            nodes.append(NodeProcess.start(capacity="4MiB", args=["--node-id", f"g{n}-{i:02d}", *args, *seed]))
        started = time.monotonic()
        want = {node.node_id for node in nodes}
        while not all(alive_ids(str(node.control)) == want for node in nodes):
            if time.monotonic() - started > 30 + n * interval_s * 4:
                raise RuntimeError(f"{n} nodes did not converge")
            time.sleep(0.1)
        converge_s = time.monotonic() - started
        time.sleep(settle_s)
        before = [gossip_bytes(node) for node in nodes]
        t0 = time.monotonic()
        time.sleep(window_s)
        after = [gossip_bytes(node) for node in nodes]
        elapsed = time.monotonic() - t0
    finally:
        for node in nodes:
            node.stop()

    def rate(direction: str) -> float:
        return sum(a[direction] - b[direction] for a, b in zip(after, before, strict=True)) / n / elapsed

    return Row(n, rate("sent"), rate("received"), converge_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="4,8,16", help="cluster sizes, comma-separated")
    parser.add_argument("--interval", type=float, default=0.2, help="--heartbeat-interval of the nodes (s)")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds after convergence before measuring")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--quick", action="store_true", help="2 and 4 nodes, short settle and window (smoke test)")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.sizes, opts.settle, opts.window = "2,4", 1.0, 3.0
    sizes = [int(s) for s in opts.sizes.split(",") if s.strip()]
    rows = []
    for n in sizes:
        row = measure(n, opts.interval, opts.settle, opts.window)
        rows.append(row)
        print(f"measured {n} nodes (converged in {row.converge_s:.1f}s)", file=sys.stderr, flush=True)
    base = rows[0].total
    print(f"membership traffic, heartbeat interval {opts.interval}s, window {opts.window:.0f}s")
    print(f"{'nodes':>5}  {'sent B/node/s':>14}  {'received B/node/s':>18}  {'total B/node/s':>15}  {'ratio':>6}")
    for row in rows:
        print(f"{row.nodes:>5}  {row.sent:>14.0f}  {row.received:>18.0f}  {row.total:>15.0f}  {row.total / base:>6.2f}")
    totals = [r.total for r in rows]
    print(f"max/min ratio: {max(totals) / min(totals):.2f} (goal: within 2x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
