"""What the cluster client adds over a direct node client, side by side in one run.

    .venv/bin/python benchmarks/cluster_client_overhead.py             # 3 nodes, R=1
    .venv/bin/python benchmarks/cluster_client_overhead.py --nodes 1

Starts local ``memkv node`` processes, stores keys through ``ClusterClient``, then alternates
(A B A B ...) reads of the same keys through ``NodeClient`` (straight to the node that holds
them) and through ``ClusterClient.get_into`` (placement, the per-node lane hop, the deadline
bookkeeping), for one key a call and for a batch a call. Prints medians per call; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lmcache_memkv.client import NodeClient
from lmcache_memkv.cluster import ClusterClient
from lmcache_memkv.node.launcher import NodeProcess


def _median_us(fn: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--value", type=int, default=4096, help="value size in bytes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calls", type=int, default=500, help="calls per measurement")
    p.add_argument("--repeat", type=int, default=3, help="A/B pairs")
    args = p.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="memkv-bench-"))
    nodes: list[NodeProcess] = []
    try:
        for i in range(args.nodes):
            extra = ["--node-id", f"b{i}"] + (["--seed", str(nodes[0].control)] if nodes else [])
            nodes.append(NodeProcess.start(capacity="256MiB", metrics=False, args=extra, log_dir=log_dir))
        cluster = ClusterClient([str(nodes[0].control)], replicas=1, timeout_s=5.0)
        cluster.start()
        deadline = time.monotonic() + 20
        while len(cluster.placement(b"x")) < args.nodes:
            if time.monotonic() > deadline:
                raise SystemExit("the cluster did not converge")
            time.sleep(0.05)
        by_id = {n.node_id: n for n in nodes}
        # Keys all on one node, so the direct client reads the same keys with one request.
        first = None
        keys: list[bytes] = []
        i = 0
        while len(keys) < args.batch:
            key = f"bench-{i}".encode()
            i += 1
            owner = cluster.placement(key)[0]
            first = first or owner
            if owner == first:
                keys.append(key)
        assert first is not None
        value = b"v" * args.value
        assert all(cluster.put(keys, [value] * len(keys)))
        direct = NodeClient(by_id[first].data, timeout_s=5.0)
        one = [bytearray(args.value)]
        many = [bytearray(args.value) for _ in keys]
        rows: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for name, fn in (
                ("node client, 1 key", lambda: direct.get_into(keys[:1], one)),
                ("cluster client, 1 key", lambda: cluster.get_into(keys[:1], one)),
                (f"node client, {len(keys)} keys", lambda: direct.get_into(keys, many)),
                (f"cluster client, {len(keys)} keys", lambda: cluster.get_into(keys, many)),
            ):
                rows.setdefault(name, []).append(_median_us(fn, args.calls))
        direct.close()
        cluster.close()
        print(f"{args.nodes} nodes, {args.value}-byte values, median of {args.calls} calls, best of {args.repeat} runs:")
        for name, figures in rows.items():
            print(f"  {name:28s} {min(figures):8.1f} us/call")
    finally:
        for node in nodes:
            node.stop()


if __name__ == "__main__":
    main()
