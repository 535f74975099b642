"""memkv over RDMA against memkv over TCP and against the device's own ceiling (perftest).

Run it where a verbs device exists: on real hardware directly, or inside the soft-RoCE guest::

    python tests/rdma/vm.py --venv .venv -- python benchmarks/rdma_vs_tcp.py --device rxe0 --gid-index 1

One node (data and control planes in this process, its arena registered with the device) and,
on the same node, a verbs data client (the node RDMA-READs PUT values from the client's
registered pool and RDMA-WRITEs GET values into it) and a TCP data client (bytes over the
socket). ``ib_write_bw`` and ``ib_read_bw`` run on the same device in the same run, server and
client both local, as the ceiling. Prints MB/s (10^6 bytes/s, as perftest does) and the ratios.
Under soft-RoCE in an emulated guest every figure is CPU-bound: the ratios say something about
overheads, nothing about a NIC's line rate.
"""

from __future__ import annotations

import argparse
import mmap
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcache_memkv.client.node_client import NodeClient
from lmcache_memkv.client.rdma_client import RdmaDataClient, RdmaSide
from lmcache_memkv.control.channel import ChannelPool
from lmcache_memkv.control.node_service import start_control_plane
from lmcache_memkv.node.config import NodeConfig
from lmcache_memkv.node.server import NodeServer
from lmcache_memkv.transport.rdma import buffer_address
from lmcache_memkv.wire.constants import Status

_BW = re.compile(r"^\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", re.MULTILINE)


def perftest(tool: str, device: str, gid_index: int, size: int, iters: int, port: int) -> float | None:
    """Average MB/s of ``tool`` (server and client on the same device), or None if it is missing."""
    exe = shutil.which(tool)
    if exe is None:
        return None
    common = [exe, "-d", device, "-x", str(gid_index), "-s", str(size), "-n", str(iters), "-p", str(port), "-F"]
    server = subprocess.Popen(common, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(3.0)  # the server must listen before the client connects (slow in the guest)
        client = subprocess.run([*common, "127.0.0.1"], capture_output=True, text=True, timeout=300)
        out = client.stdout + client.stderr
        m = _BW.search(out)
        if client.returncode != 0 or m is None:
            print(f"{tool} failed (exit {client.returncode}):\n{out[-1500:]}", file=sys.stderr)
            return None
        return float(m.group(4))  # BW average[MB/sec]
    finally:
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def timed(label: str, fn: object, nbytes: int, rounds: int) -> float:
    assert callable(fn)
    fn()  # warm-up (sets up sessions and connections)
    started = time.perf_counter()
    for _ in range(rounds):
        fn()
    elapsed = time.perf_counter() - started
    mbps = nbytes * rounds / elapsed / 1e6
    print(f"  {label:<24} {mbps:9.1f} MB/s  ({rounds} x {nbytes} bytes in {elapsed:.2f} s)")
    return mbps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=os.environ.get("MEMKV_RDMA_DEVICE", "rxe0"))
    p.add_argument("--gid-index", type=int, default=int(os.environ.get("MEMKV_RDMA_GID_INDEX", "1")))
    p.add_argument("--value-kib", type=int, default=256)
    p.add_argument("--keys", type=int, default=8, help="values per batch")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    size = args.value_kib << 10
    batch = size * args.keys

    config = NodeConfig(listen="127.0.0.1:0", control_listen="127.0.0.1:0", capacity=max(64 << 20, 4 * batch),
                        node_id="bench", rdma_device=args.device, rdma_gid_index=args.gid_index)  # fmt: skip
    server = NodeServer(config)
    server.start()
    plane = start_control_plane(server, config)
    pool = mmap.mmap(-1, 2 * batch)
    view = memoryview(pool)
    src = [view[i * size : (i + 1) * size] for i in range(args.keys)]
    dst = [view[batch + i * size : batch + (i + 1) * size] for i in range(args.keys)]
    for s in src:
        s[:] = os.urandom(size)
    keys = [f"bench-{i}".encode() for i in range(args.keys)]
    addr, length = buffer_address(pool)
    side = RdmaSide(args.device, 1, args.gid_index, addr, length)
    channels = ChannelPool(None)
    member = plane.membership.local
    rdma = RdmaDataClient(member, None, 60.0, os.urandom(16), side, channels)
    tcp = NodeClient(member.data_endpoint, None, 60.0)
    results: dict[str, float | None] = {}
    try:
        print(f"memkv on {args.device} (GID index {args.gid_index}): batches of {args.keys} x {args.value_kib} KiB")

        def rput() -> None:
            assert rdma.put(keys, src) == [Status.OK] * args.keys

        def rget() -> None:
            assert list(rdma.read_into(keys, dst, exact=True).statuses) == [Status.OK] * args.keys

        def tput() -> None:
            assert tcp.put(keys, src) == [Status.OK] * args.keys

        def tget() -> None:
            assert list(tcp.read_into(keys, dst, exact=True).statuses) == [Status.OK] * args.keys

        results["memkv RDMA put (READ)"] = timed("memkv RDMA put (READ)", rput, batch, args.rounds)
        results["memkv RDMA get (WRITE)"] = timed("memkv RDMA get (WRITE)", rget, batch, args.rounds)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(src, dst, strict=True)), "RDMA round trip not byte-exact"
        results["memkv TCP put"] = timed("memkv TCP put", tput, batch, args.rounds)
        results["memkv TCP get"] = timed("memkv TCP get", tget, batch, args.rounds)
        rdma_bytes = server.metrics.transport_bytes.labels("bench", "rdma", "in")._value.get()
        print(f"  node counters: rdma in {rdma_bytes:.0f} bytes")
    finally:
        rdma.close()
        tcp.close()
        channels.close()
        side.close()
        plane.stop()
        server.stop(0)
    iters = max(50, min(2000, (args.rounds * batch) // size))
    print(f"perftest on {args.device}: {size}-byte messages, {iters} iterations")
    results["ib_write_bw"] = perftest("ib_write_bw", args.device, args.gid_index, size, iters, 18515)
    results["ib_read_bw"] = perftest("ib_read_bw", args.device, args.gid_index, size, iters, 18516)
    for name in ("ib_write_bw", "ib_read_bw"):
        v = results[name]
        print(f"  {name:<24} {'n/a' if v is None else f'{v:9.1f} MB/s'}")

    def ratio(a: str, b: str) -> str:
        x, y = results.get(a), results.get(b)
        return "n/a" if not x or not y else f"{x / y:.2f}"

    print("ratios:")
    print(f"  RDMA get / TCP get          {ratio('memkv RDMA get (WRITE)', 'memkv TCP get')}")
    print(f"  RDMA put / TCP put          {ratio('memkv RDMA put (READ)', 'memkv TCP put')}")
    print(f"  RDMA get / ib_write_bw      {ratio('memkv RDMA get (WRITE)', 'ib_write_bw')}")
    print(f"  RDMA put / ib_read_bw       {ratio('memkv RDMA put (READ)', 'ib_read_bw')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
