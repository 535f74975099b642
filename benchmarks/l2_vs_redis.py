"""LMCache's own L2 benchmark on memkv and on LMCache's ``resp`` adapter + redis-server, side by side.

    .venv/bin/python benchmarks/l2_vs_redis.py            # 1 MiB values, 32 keys a task, 4 in flight

One run starts a local ``memkv node`` and a local ``redis-server`` (both loopback, both
in memory), then runs ``lmcache bench l2 --no-skip-verify --lookup-max-hit-rate 1.0`` with
the same parameters against each, alternating A B A B ... for ``--repeat`` pairs, and
prints the medians with memkv/resp ratios. It also measures raw loopback TCP throughput in
the same run, so the load figure can be read as a fraction of what the socket can carry.
Nothing here asserts a speed: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from node_throughput import RawPair

from lmcache_memkv.node.launcher import NodeProcess

MIB = 1 << 20


@dataclass
class Figures:
    store_gbps: float
    lookup_keys_s: float
    load_gbps: float
    verified: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lmcache() -> str:
    exe = Path(sys.executable).with_name("lmcache")
    return str(exe) if exe.exists() else "lmcache"


def start_redis(maxmemory: str) -> tuple[subprocess.Popen[bytes], int]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server not found: apt-get install redis-server (the peer this benchmark compares with)")
    port = _free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("redis-server did not come up")


def run_bench(adapter: dict, args: argparse.Namespace, out_dir: Path, tag: str) -> Figures:
    out = out_dir / f"{tag}.json"
    cmd = [
        _lmcache(), "bench", "l2", "--l2-adapter", json.dumps(adapter),
        "--data-size-kb", str(args.value_kb), "--num-keys", str(args.num_keys), "--in-flight", str(args.in_flight),
        "--rounds", str(args.rounds), "--warmup-rounds", "1", "--no-skip-verify", "--lookup-max-hit-rate", "1.0",
        "--format", "json", "--output", str(out), "-q",
    ]
    env = dict(os.environ, LMCACHE_TRACK_USAGE="false", LMCACHE_DISABLE_BANNER="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"lmcache bench l2 failed for {tag} (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = json.loads(out.read_text())["metrics"]
    ops = {m["operation"]: m for k, m in metrics.items() if k.startswith("op_")}
    verified = all(m["total_success"] == m["total_keys"] for m in ops.values())
    return Figures(
        store_gbps=ops["Store"]["throughput_avg_mbps"] * MIB / 1e9,
        lookup_keys_s=ops["Lookup"]["ops_per_sec_avg"],
        load_gbps=ops["Load"]["throughput_avg_mbps"] * MIB / 1e9,
        verified=verified,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--value-kb", type=int, default=1024, help="value size in KiB (default 1024 = 1 MiB)")
    p.add_argument("--num-keys", type=int, default=32, help="keys per submitted task")
    p.add_argument("--in-flight", type=int, default=4, help="tasks in flight per round")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per lmcache bench run")
    p.add_argument("--repeat", type=int, default=3, help="A/B pairs; medians are reported")
    p.add_argument("--memkv-json", default="", help="extra memkv adapter fields as JSON, e.g. '{\"num_workers\": 8}'")
    args = p.parse_args()

    per_round = args.value_kb * 1024 * args.num_keys * args.in_flight
    capacity = max(per_round * (args.rounds + 2) * 2, 256 * MIB)
    node = NodeProcess.start(capacity=str(capacity), metrics=False)
    redis, redis_port = start_redis(str(capacity))
    memkv: list[Figures] = []
    resp: list[Figures] = []
    raw_outbound: list[float] = []
    raw: RawPair | None = None
    try:
        if node.control is None:
            raise SystemExit("memkv node did not report a control endpoint")
        memkv_adapter = {"type": "memkv", "servers": node.control, **json.loads(args.memkv_json or "{}")}
        resp_adapter = {"type": "resp", "host": "127.0.0.1", "port": redis_port}
        # Raw loopback: one process to another, the direction of a load, same value size and
        # buffer count, measured between the A/B pairs so all three see the same machine.
        raw = RawPair(args.value_kb * 1024, args.num_keys * args.in_flight, args.num_keys)
        raw.outbound()  # warm-up
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeat):
                memkv.append(run_bench(memkv_adapter, args, Path(tmp), f"memkv{i}"))
                resp.append(run_bench(resp_adapter, args, Path(tmp), f"resp{i}"))
                raw_outbound += [raw.outbound() for _ in range(3)]
    finally:
        if raw is not None:
            raw.close()
        node.stop()
        redis.terminate()
        redis.wait(10)

    def med(xs: list[Figures], attr: str) -> float:
        return statistics.median(getattr(f, attr) for f in xs)

    raw_out = statistics.median(raw_outbound)
    print(f"lmcache bench l2: {args.value_kb} KiB values, {args.num_keys} keys/task, {args.in_flight} in flight, "
          f"{args.rounds} rounds, --no-skip-verify, {args.repeat} A/B pairs (medians)")
    print(f"raw loopback TCP (one stream, same sizes): {raw_out:.2f} GB/s")
    print()
    print(f"{'metric':<22}{'memkv':>12}{'resp+redis':>14}{'memkv/resp':>12}")
    rows = [("store GB/s", "store_gbps", 2), ("lookup keys/s", "lookup_keys_s", 0), ("load GB/s", "load_gbps", 2)]
    for name, attr, digits in rows:
        a, b = med(memkv, attr), med(resp, attr)
        print(f"{name:<22}{a:>12,.{digits}f}{b:>14,.{digits}f}{a / b:>11.2f}x")
    print(f"{'memkv load / raw':<22}{med(memkv, 'load_gbps') / raw_out:>11.0%}")
    ok = all(f.verified for f in memkv + resp)
    print(f"every key verified: {'yes' if ok else 'NO'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
