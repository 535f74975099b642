"""memkv against its peers through LMCache's own L2 benchmark, with loopback and memcpy references.

    .venv/bin/python benchmarks/peers.py                  # 64 KiB, 1 MiB, 8 MiB x in flight 1, 4, 16; 3 repeats
    .venv/bin/python benchmarks/peers.py --quick          # seconds: small values, 1 repeat (the smoke test)
    .venv/bin/python benchmarks/peers.py --sizes 1MiB --in-flight 4 --systems memkv,resp

Every figure comes from ``lmcache bench l2 --no-skip-verify --lookup-max-hit-rate 1.0 --format json``
(one subprocess per run) against one of:

- ``memkv``: a local ``memkv node`` through this project's L2 adapter;
- ``resp``: LMCache's ``resp`` adapter on a local ``redis-server`` (in memory, no persistence);
- ``fs_native``: LMCache's ``fs_native`` adapter on a directory under /dev/shm (tmpfs), emptied
  after every run and removed at the end. A local ceiling with no network and no server, not a peer;
- ``mooncake_store``: a local Mooncake Store (master + client) through ``benchmarks/mooncake_peer.py``;
  skipped, with the reason printed, when that module is missing or Mooncake cannot start here.

All servers bind loopback. Runs are interleaved: each repeat walks the grid (value size x in
flight) and runs every system on each cell, the system order rotated per repeat, so a drifting
machine affects all alike. Keys per task are chosen so a round (in flight x keys x value) stays
within ``--round-bytes`` (at most ``--max-keys`` a task); small rounds are run more often (up to
``--max-rounds``) so each run stores ``--run-bytes`` and looks up thousands of keys. Every round
stores fresh keys, so a run keeps its 1 warm-up + measured rounds resident (at most 768 MiB with
the defaults); each store's capacity covers what the whole grid leaves resident plus one run (3.1 GiB
with the defaults; the memkv node allocates it up front). The header prints what was used.

In the same run, for each value size: raw loopback TCP with 1 and 4 streams (``node_throughput.RawPair``
connections to peer processes, driven at once from as many threads, cycling through distinct
buffers of the value size) and single-thread memcpy of the value size (numpy). memkv's load is
printed as a percentage of raw TCP with as many streams as tasks in flight (1 vs 1, 4 vs 4).

Every bench process runs with ``OMP_NUM_THREADS=1`` (``--bench-omp-threads``): the bench zeroes its
load buffers with torch right before each timed load round, and torch's OpenMP workers would then
spin on a CPU through the round (perf: 95% of such a thread in libgomp), whichever system is measured.

CPU per byte: user+system CPU seconds (/proc/PID/stat, all threads) of the store-side processes
and of the ``lmcache bench l2`` process, sampled when the benchmark logs the end of its warm-up
store round and when it starts verifying, so interpreter start-up, adapter set-up and first
connections are left out; divided by the bytes stored and loaded in that window (the measured
store rounds, every load round; lookups fall in the window but move no value bytes). Mooncake's store side is mooncake_client plus
mooncake_master, each also shown alone. fs_native has no store process (its file I/O is the
bench process's system time).

Medians over repeats with [min-max]; ratios are of medians. Exits non-zero if any run failed or
any key failed verification. Nothing here asserts a speed: it prints what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from node_throughput import RawPair, cpu_seconds
from redis_peer import start_redis

from lmcache_memkv.node.launcher import NodeProcess, node_env
from lmcache_memkv.sizes import format_size, parse_size

MIB = 1 << 20
SYSTEMS = ("memkv", "resp", "fs_native", "mooncake_store")
PEERS = ("resp", "mooncake_store")  # what memkv is compared with; fs_native is a local ceiling
RAW_STREAMS = (1, 4)
WARMUP_ROUNDS = 1
BUFFER_SET_BYTES = 32 * MIB  # distinct buffers per side for raw and memcpy: more than a CPU cache holds
REFERENCE_BYTES = 256 * MIB  # bytes per raw-TCP stream or memcpy sample
BENCH_TIMEOUT_S = 300  # a run takes seconds to a minute; a stalled one is killed and counted as failed


# ----------------------------------------------------------------------------- processes


def _lmcache() -> str:
    exe = Path(sys.executable).with_name("lmcache")
    return str(exe) if exe.exists() else "lmcache"


@dataclass
class System:
    """One system under test: the adapter spec and the processes whose CPU counts as its store side."""

    name: str
    adapter: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    scratch: Path | None = None  # fs_native: its base_path, emptied after every run
    # Mooncake: a fresh peer for every run (returns adapter, env, pids and its stop). Mooncake keeps
    # the first value put under a key and lmcache bench l2 numbers its keys from 0 in every run, so
    # a peer reused across runs serves the previous run's bytes and fails verification.
    fresh: Callable[[], tuple[dict[str, Any], dict[str, str], dict[str, int], Callable[[], None]]] | None = None
    _stop: Callable[[], None] | None = None

    def before_run(self) -> None:
        if self.scratch is not None:
            self.scratch.mkdir(parents=True, exist_ok=True)
        if self.fresh is not None:
            self.adapter, self.env, self.pids, self._stop = self.fresh()

    def after_run(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if self._stop is not None:
            stop, self._stop = self._stop, None
            stop()


def mooncake_peer(capacity: int, stack: contextlib.ExitStack) -> System | str:
    """The Mooncake Store system, or the one-line reason it is skipped."""
    try:
        module = importlib.import_module("mooncake_peer")
    except ImportError as exc:
        return f"benchmarks/mooncake_peer.py not importable: {exc}"
    reason = module.unavailable()
    if reason:
        return str(reason)
    def fresh() -> tuple[dict[str, Any], dict[str, str], dict[str, int], Callable[[], None]]:
        # Up to 3 tries: the master binds four ports picked free beforehand, and one of them can be
        # taken in between by another process's ephemeral port (seen: "Failed to start master admin server").
        for attempt in range(3):
            try:
                peer = module.MooncakePeer.start(capacity)
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                time.sleep(1.0)
        return dict(peer.adapter), dict(peer.env), dict(peer.pids), peer.stop

    try:  # one start up front, so a Mooncake that cannot start here is skipped with its reason
        _, _, _, stop = fresh()
    except Exception as exc:  # a peer that cannot start is skipped, not fatal: the others still run
        return f"Mooncake did not start: {exc!r}"
    stop()
    system = System("mooncake_store", {}, fresh=fresh)
    stack.callback(system.after_run)
    return system


def start_systems(names: Sequence[str], capacity: int, stack: contextlib.ExitStack, memkv_extra: dict[str, Any]) -> list[System]:
    systems: list[System] = []
    for name in names:
        if name == "memkv":
            node = NodeProcess.start(capacity=str(capacity), metrics=False, args=["--log-level", "warning"])
            stack.callback(node.stop)
            if node.control is None:
                raise SystemExit("memkv node did not report a control endpoint")
            systems.append(System("memkv", {"type": "memkv", "servers": node.control, **memkv_extra},
                                  pids={"memkv_node": node.pid}))
        elif name == "resp":
            redis, port = start_redis(capacity)
            stack.callback(redis.wait, 10)
            stack.callback(redis.terminate)
            systems.append(System("resp", {"type": "resp", "host": "127.0.0.1", "port": port},
                                  pids={"redis_server": redis.pid}))
        elif name == "fs_native":
            root = Path(tempfile.mkdtemp(prefix="memkv-peers-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
            stack.callback(shutil.rmtree, root, True)
            kv = root / "kv"
            systems.append(System("fs_native", {"type": "fs_native", "base_path": str(kv)}, scratch=kv))
        elif name == "mooncake_store":
            got = mooncake_peer(capacity, stack)
            if isinstance(got, str):
                print(f"mooncake_store: skipped ({got})", flush=True)
            else:
                systems.append(got)
    return systems


# ----------------------------------------------------------------------------- one bench run


@dataclass
class Run:
    system: str
    value: int
    in_flight: int
    store_gbps: float = float("nan")
    lookup_keys_s: float = float("nan")
    load_gbps: float = float("nan")
    verified: bool = False
    cpu_s_per_gb: dict[str, float] = field(default_factory=dict)  # process name (or "bench") -> s/GB
    error: str = ""


def _sample(bench_pid: int, system: System) -> dict[str, float | None]:
    return {"bench": cpu_seconds(bench_pid), **{n: cpu_seconds(p) for n, p in system.pids.items()}}


def run_bench(system: System, value: int, in_flight: int, num_keys: int, rounds: int, out_dir: Path, omp_threads: int = 1) -> Run:
    run = Run(system.name, value, in_flight)
    try:
        system.before_run()
    except Exception as exc:  # e.g. a fresh Mooncake that did not start: this run fails, the grid goes on
        system.after_run()
        run.error = f"{system.name} did not start: {exc!r}"
        return run
    out = out_dir / f"{system.name}-{value}-{in_flight}.json"
    out.unlink(missing_ok=True)
    cmd = [
        _lmcache(), "bench", "l2", "--l2-adapter", json.dumps(system.adapter),
        "--data-size-kb", str(value // 1024), "--num-keys", str(num_keys), "--in-flight", str(in_flight),
        "--rounds", str(rounds), "--warmup-rounds", str(WARMUP_ROUNDS), "--no-skip-verify",
        "--lookup-max-hit-rate", "1.0", "--format", "json", "--output", str(out),
    ]
    # Not -q: its progress lines ("[Store] Round 1: ...", "[Verify] ...") bound the CPU window.
    # lmcache bench l2 zeroes every load buffer with torch just before each timed load round; torch's
    # OpenMP workers then spin (libgomp's wait policy) on a CPU through the round, taking it from
    # the store and the adapter alike. One thread (default) removes that harness cost for every system.
    env = node_env(system.env)
    if omp_threads:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    else:
        env.pop("OMP_NUM_THREADS", None)  # torch's default, whatever this shell set
    start: dict[str, float | None] | None = None
    end: dict[str, float | None] | None = None
    tail: deque[str] = deque(maxlen=40)
    try:
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            watchdog = threading.Timer(BENCH_TIMEOUT_S, proc.kill)
            watchdog.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    if line.lstrip().startswith("["):  # progress lines; the JSON report is in the file
                        tail.append(line)
                    if start is None and line.lstrip().startswith("[Store] Round"):
                        start = _sample(proc.pid, system)
                    elif end is None and line.startswith("[Verify]"):
                        end = _sample(proc.pid, system)
                rc = proc.wait()
            finally:
                watchdog.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            err.seek(0)
            errtext = err.read()[-3000:]
    finally:
        system.after_run()
    if rc != 0 or not out.exists():
        run.error = f"lmcache bench l2 exit {rc}:\n{''.join(tail)[-3000:]}\n{errtext}"
        return run
    metrics = json.loads(out.read_text())["metrics"]
    ops = {m["operation"]: m for k, m in metrics.items() if k.startswith("op_")}
    run.verified = set(ops) == {"Store", "Lookup", "Load"} and all(
        m["total_success"] == m["total_keys"] for m in ops.values()
    )
    if not run.verified:
        run.error = "not every key verified: " + ", ".join(
            f"{op} {m['total_success']}/{m['total_keys']}" for op, m in ops.items()
        )
    run.store_gbps = ops["Store"]["throughput_avg_mbps"] * MIB / 1e9
    run.lookup_keys_s = ops["Lookup"]["ops_per_sec_avg"]
    run.load_gbps = ops["Load"]["throughput_avg_mbps"] * MIB / 1e9
    # The window opens after the warm-up store round (connections, first touch of buffers): the
    # measured store rounds plus every load round.
    moved_gb = (rounds + WARMUP_ROUNDS + rounds) * in_flight * num_keys * value / 1e9
    if start is not None and end is not None:
        for name, before in start.items():
            after = end.get(name)
            if before is not None and after is not None:
                run.cpu_s_per_gb[name] = (after - before) / moved_gb
    return run


# ----------------------------------------------------------------------------- references


class RawStreams:
    """``streams`` RawPair connections (each to its own peer process), driven at once from as many threads."""

    def __init__(self, value: int, streams: int) -> None:
        count = max(1, REFERENCE_BYTES // value)
        batch = max(1, min(count, BUFFER_SET_BYTES // value))
        self.pairs: list[RawPair] = []
        try:
            for _ in range(streams):
                self.pairs.append(RawPair(value, count, batch))
        except BaseException:
            self.close()
            raise

    def gbps(self, streams: int) -> float:
        """Aggregate GB/s of the first ``streams`` connections, us -> peers, from start until all peers have it."""
        pairs = self.pairs[:streams]
        threads = [threading.Thread(target=p.outbound) for p in pairs]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(p.total for p in pairs) / (time.perf_counter() - started) / 1e9

    def close(self) -> None:
        for p in self.pairs:
            p.close()
        self.pairs = []


def memcpy_gbps(value: int) -> float:
    """One thread copying value-sized blocks between two sets of distinct buffers (numpy.copyto)."""
    n = max(2, BUFFER_SET_BYTES // value)
    src = np.frombuffer(os.urandom(value), dtype=np.uint8)
    srcs = np.tile(src, (n, 1))
    dsts = np.zeros_like(srcs)
    copies = max(n, REFERENCE_BYTES // value)
    started = time.perf_counter()
    for i in range(copies):
        np.copyto(dsts[i % n], srcs[i % n])
    return copies * value / (time.perf_counter() - started) / 1e9


# ----------------------------------------------------------------------------- report


def spread(xs: Sequence[float]) -> tuple[float, float, float] | None:
    xs = [x for x in xs if x == x]  # drop NaN (failed runs)
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def cell(s: tuple[float, float, float] | None, digits: int) -> str:
    if s is None:
        return "-"
    med, lo, hi = s
    return f"{med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


@dataclass(frozen=True)
class Shape:
    """What one run of a grid cell does: keys per task and measured rounds."""

    keys: int
    rounds: int
    round_bytes: int

    @classmethod
    def of(cls, value: int, in_flight: int, args: argparse.Namespace) -> Shape:
        keys = max(1, min(args.max_keys, args.round_bytes // (value * in_flight)))
        per_round = in_flight * keys * value
        # Small rounds take microseconds: more of them, so each run measures at least --run-bytes.
        rounds = max(args.rounds, min(args.max_rounds, -(-args.run_bytes // per_round)))
        return cls(keys, rounds, per_round)

    @property
    def resident(self) -> int:
        return (WARMUP_ROUNDS + self.rounds) * self.round_bytes


@dataclass
class Results:
    runs: list[Run] = field(default_factory=list)
    raw: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # (value, streams) -> GB/s
    memcpy: dict[int, list[float]] = field(default_factory=dict)  # value -> GB/s

    def of(self, system: str, value: int, in_flight: int) -> list[Run]:
        return [r for r in self.runs if (r.system, r.value, r.in_flight) == (system, value, in_flight)]


METRICS = (("store GB/s", "store_gbps", 2), ("load GB/s", "load_gbps", 2), ("lookup keys/s", "lookup_keys_s", 0))
COL = 22


def line(first: str, *cells: str, width: int = COL) -> str:
    """One table row: a label column, then cells of ``width``; at least two spaces between any two."""
    return "  ".join([f"{first:<24}", *(f"{c:<{width}}" for c in cells)]).rstrip()


def print_value_table(res: Results, names: list[str], value: int, in_flights: list[int], args: argparse.Namespace) -> None:
    shapes = ", ".join(
        f"in flight {f}: {sh.keys} keys/task x {sh.rounds} rounds ({format_size(sh.round_bytes)}/round)"
        for f in in_flights
        for sh in [Shape.of(value, f, args)]
    )
    print(f"== {format_size(value)} values ({shapes})")
    print(line("metric @ in_flight", *names, "memkv/best_peer", "memkv/mooncake"))
    for label, attr, digits in METRICS:
        for f in in_flights:
            meds: dict[str, float] = {}
            cells = []
            for n in names:
                s = spread([getattr(r, attr) for r in res.of(n, value, f)])
                cells.append(cell(s, digits))
                if s is not None:
                    meds[n] = s[0]
            peers = {p: meds[p] for p in PEERS if p in meds}
            best = "-"
            if "memkv" in meds and peers:
                top = max(peers, key=peers.__getitem__)
                best = f"{meds['memkv'] / peers[top]:.2f}x ({top})"
            vs_mc = f"{meds['memkv'] / meds['mooncake_store']:.2f}x" if "memkv" in meds and "mooncake_store" in meds else "-"
            print(line(f"{label} @ {f}", *cells, best, vs_mc))
    for streams in RAW_STREAMS:
        unit = "stream" if streams == 1 else "streams"
        print(line(f"raw TCP {streams} {unit} GB/s", cell(spread(res.raw.get((value, streams), [])), 2)))
    print(line("memcpy GB/s", cell(spread(res.memcpy.get(value, [])), 2)))
    for streams in RAW_STREAMS:
        raw = spread(res.raw.get((value, streams), []))
        load = spread([r.load_gbps for r in res.of("memkv", value, streams)])
        if raw is not None and load is not None:
            print(line(f"memkv load / raw TCP @ {streams}", f"{load[0] / raw[0]:.0%}"))
    print()


def print_cpu_tables(res: Results, systems: list[System], sizes: list[int], in_flights: list[int]) -> None:
    print("== CPU seconds per GB moved (user+system; bytes stored + loaded; medians [min-max])")
    for system in systems:
        cols = list(system.pids)
        if len(cols) > 1:
            cols.append("store_total")
        cols.append("bench")
        store_side = " + ".join(system.pids) if system.pids else "none"
        print(f"-- {system.name} (store side: {store_side}; bench: the lmcache bench l2 process)")
        print(line("value @ in_flight", *cols))
        for value in sizes:
            for f in in_flights:
                runs = res.of(system.name, value, f)
                cells = []
                for c in cols:
                    if c == "store_total":
                        xs = [sum(r.cpu_s_per_gb[p] for p in system.pids) for r in runs
                              if all(p in r.cpu_s_per_gb for p in system.pids)]
                    else:
                        xs = [r.cpu_s_per_gb[c] for r in runs if c in r.cpu_s_per_gb]
                    cells.append(cell(spread(xs), 3))
                print(line(f"{format_size(value)} @ {f}", *cells))
    print()


# ----------------------------------------------------------------------------- main


def _csv(kind: Callable[[str], Any], text: str) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64KiB,1MiB,8MiB", help="value sizes, comma-separated (default 64KiB,1MiB,8MiB)")
    p.add_argument("--in-flight", default="1,4,16", help="tasks in flight, comma-separated (default 1,4,16)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"a subset of {','.join(SYSTEMS)} (memkv always runs)")
    p.add_argument("--repeat", type=int, default=3, help="repeats of the whole grid; medians are reported (default 3)")
    p.add_argument("--round-bytes", default="128MiB", help="most bytes per round: in flight x keys x value (default 128MiB)")
    p.add_argument("--max-keys", type=int, default=64, help="most keys per task (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="fewest measured rounds per lmcache bench run (default 5)")
    p.add_argument("--run-bytes", default="512MiB", help="more rounds, up to --max-rounds, until a run stores this much (default 512MiB)")
    p.add_argument("--max-rounds", type=int, default=64, help="most measured rounds per run (default 64)")
    p.add_argument("--bench-omp-threads", type=int, default=1,
                   help="OMP_NUM_THREADS of every lmcache bench l2 process (default 1; 0: torch's default, whose "
                        "OpenMP workers spin through each load round after the bench zeroes its buffers)")
    p.add_argument("--memkv-json", default="", help="extra memkv adapter fields as JSON, e.g. '{\"num_workers\": 8}'")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64KiB values, in flight 1,4, 1 repeat, 2 rounds of 1MiB a run")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.in_flight, args.repeat = "64KiB", "1,4", 1
        args.rounds, args.max_rounds, args.round_bytes, args.run_bytes = 2, 2, "1MiB", "1MiB"
    args.sizes = _csv(parse_size, args.sizes)
    args.in_flight = _csv(int, args.in_flight)
    args.systems = _csv(str, args.systems)
    args.round_bytes = parse_size(args.round_bytes)
    args.run_bytes = parse_size(args.run_bytes)
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    args.systems = [n for n in SYSTEMS if n in args.systems or n == "memkv"]  # table columns in a fixed order
    if any(v < 1024 or v % 1024 for v in args.sizes):
        p.error("value sizes must be whole KiB (lmcache bench l2 takes --data-size-kb)")
    if min(args.in_flight) < 1 or min(args.repeat, args.rounds, args.max_rounds, args.max_keys, args.round_bytes) < 1:
        p.error("counts and sizes must be positive")
    if args.bench_omp_threads < 0:
        p.error("--bench-omp-threads must be 0 (torch's default) or more")
    return args


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the ExitStack: nodes, redis, Mooncake stopped, /dev/shm cleaned


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    began = time.monotonic()
    sizes: list[int] = args.sizes
    in_flights: list[int] = args.in_flight
    per_run = max(Shape.of(v, f, args).resident for v in sizes for f in in_flights)
    # Every run writes keys 0, 1, 2, ... (lmcache bench l2's numbering), so what stays resident across
    # the grid is at most, per value size, its largest run; each store gets that plus room for one more
    # run's overwrites. A store that fills up evicts, and a Redis at maxmemory stalled LMCache's resp
    # adapter outright in a trial run.
    live = sum(max(Shape.of(v, f, args).resident for f in in_flights) for v in sizes)
    capacity = max(live + per_run + 256 * MIB, 512 * MIB)
    print(f"lmcache bench l2 --no-skip-verify --lookup-max-hit-rate 1.0, fresh keys each round: keys/task so a round "
          f"stays within {format_size(args.round_bytes)} (at most {args.max_keys}); {WARMUP_ROUNDS} warm-up + "
          f"{args.rounds}-{args.max_rounds} rounds so a run stores {format_size(args.run_bytes)} where it can; "
          f"at most {format_size(per_run)} resident a run; {args.repeat} repeats, system order rotated per repeat; "
          f"store capacity {format_size(capacity)} each; {os.cpu_count()} CPUs; bench OMP_NUM_THREADS="
          f"{args.bench_omp_threads or 'unset'}", flush=True)

    res = Results()
    failures: list[str] = []
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        systems = start_systems(args.systems, capacity, stack, json.loads(args.memkv_json or "{}"))
        for rep in range(args.repeat):
            k = rep % len(systems)
            order = systems[k:] + systems[:k]
            for value in sizes:
                for f in in_flights:
                    shape = Shape.of(value, f, args)
                    for system in order:
                        run = run_bench(system, value, f, shape.keys, shape.rounds, Path(tmp), args.bench_omp_threads)
                        res.runs.append(run)
                        print(f"[{rep + 1}/{args.repeat}] {format_size(value)} in flight {f} {system.name}: "
                              f"store {run.store_gbps:.2f} GB/s, lookup {run.lookup_keys_s:.0f} keys/s, "
                              f"load {run.load_gbps:.2f} GB/s{'' if run.verified else ' FAILED'}", file=sys.stderr, flush=True)
                        if run.error:
                            failures.append(f"{system.name} {format_size(value)} in flight {f}: {run.error}")
                            print(run.error, file=sys.stderr, flush=True)
                # References for this value size, between the systems' runs so they see the same machine.
                # The pairs hold value-sized buffers in 2 x streams processes: only while measuring.
                raw = RawStreams(value, max(RAW_STREAMS))
                try:
                    raw.gbps(max(RAW_STREAMS))  # warm-up
                    for _ in range(3):
                        for streams in RAW_STREAMS:
                            res.raw.setdefault((value, streams), []).append(raw.gbps(streams))
                        res.memcpy.setdefault(value, []).append(memcpy_gbps(value))
                finally:
                    raw.close()

    print()
    names = [s.name for s in systems]
    for value in sizes:
        print_value_table(res, names, value, in_flights, args)
    print_cpu_tables(res, systems, sizes, in_flights)
    ok = not failures and all(r.verified for r in res.runs)
    # A run whose store would not start moved no keys: counted apart, so "verified" means what it says.
    unstarted = sum(1 for r in res.runs if " did not start: " in r.error)
    checked = [r for r in res.runs if " did not start: " not in r.error]
    print(f"runs: {len(res.runs)}, every key verified: {'yes' if all(r.verified for r in checked) else 'NO'}"
          + (f" ({unstarted} run(s) whose store did not start left out)" if unstarted else ""))
    print(f"wall time: {time.monotonic() - began:.0f} s")
    for line in failures:
        print(f"FAILED {line.splitlines()[0]}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
