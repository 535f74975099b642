"""End to end through the sidecar: a real ``lmcache server`` whose retrievals come from L2.

    .venv/bin/python benchmarks/sidecar_e2e.py                    # memkv, resp (redis), mooncake_store
    .venv/bin/python benchmarks/sidecar_e2e.py --profile memkv    # + py-spy of the server and the client

For each system it starts the L2 (a ``memkv node``; a ``redis-server`` behind LMCache's ``resp``
adapter; a Mooncake Store via ``benchmarks/mooncake_peer.py`` when Mooncake can be started) and
one ``lmcache server`` with that L2 adapter, and drives it with LMCache's CPU-mode MP client
through ``lmcache_memkv.sidecar.workload`` (the harness ``memkv demo`` uses). Each round stores
``--requests`` fresh requests of ``--tokens`` tokens, waits until LMCache's write-behind has put
every chunk in L2, clears L1 (``POST /cache/clear``), then LOOKUPs (L2 -> L1 prefetch) and
RETRIEVEs every request into zeroed pages and compares every byte. LMCache's L1/L2 lookup
counters (and the L2's own: the node's reads, redis' keyspace hits) prove where the chunks came
from. An "L1 only" server (no L2 adapter, nothing cleared) runs the same rounds: the ceiling of
LMCache plus the CPU-mode client on this machine.

Rounds are interleaved (rotating order) and repeated; medians and ranges are printed. Figures:
``store`` is the client's STORE calls (SHM -> L1); ``store->L2`` runs until the store
controllers are idle (every chunk written to L2); ``retrieve`` is LOOKUP (incl. the prefetch)
plus RETRIEVE. The byte checks and the filling of the client's pages are outside all three.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("LMCACHE_DISABLE_BANNER", "1")

from redis_peer import start_redis

from lmcache_memkv.node.launcher import NodeProcess
from lmcache_memkv.sidecar.process import SidecarConfig, SidecarProcess, parse_metric_value
from lmcache_memkv.sidecar.workload import KVGeometry, RequestSpec, Workload, WorkloadConfig

MIB = 1 << 20
L1_ONLY = "L1 only"
SYSTEMS = ("memkv", "resp", "mooncake_store")
_L2_HITS = "lmcache_mp_lookup_hit_l2_keys"
_L1_HITS = "lmcache_mp_lookup_hit_l1_keys"
_L2_STORED = "lmcache_mp_l2_store_completed_objects_chunks"


class BenchError(RuntimeError):
    """A round did not do what the benchmark needs (a chunk missing, a byte wrong, L1 not cleared)."""


@dataclass
class Round:
    """One store + retrieve round of one system."""

    tokens: int
    nbytes: int
    chunks: int
    store_s: float
    store_l2_s: float
    retrieve_s: float
    l2_stored: int
    l2_hits: int
    l1_hits: int
    backend_reads: int | None
    verified: int
    store_ms: float  # per-request medians of the client's calls
    lookup_ms: float
    retrieve_ms: float


@dataclass
class System:
    """One L2 (or none) with its own ``lmcache server`` and client."""

    name: str
    adapter: dict[str, Any] | None
    env: dict[str, str] = field(default_factory=dict)
    backend_reads: Callable[[], int] | None = None
    backend_pids: dict[str, int] = field(default_factory=dict)
    sidecar: SidecarProcess | None = None
    workload: Workload | None = None
    rounds: list[Round] = field(default_factory=list)


# ---------------------------------------------------------------------------- backends


def _redis_hits(port: int) -> int:
    """``keyspace_hits`` from redis' INFO (plain RESP over a socket: no client library needed)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"INFO stats\r\n")
        while True:  # one bulk string: "$<n>\r\n<n bytes>\r\n"
            head, sep, _ = data.partition(b"\r\n")
            if sep and len(data) >= len(head) + 2 + int(head[1:]) + 2:
                break
            chunk = s.recv(65536)
            if not chunk:
                raise BenchError("redis closed the connection during INFO")
            data += chunk
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("keyspace_hits:"):
            return int(line.split(":", 1)[1])
    raise BenchError("redis INFO stats has no keyspace_hits")


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_proc(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _node_reads(node: NodeProcess) -> Callable[[], int]:
    from lmcache_memkv.client import NodeClient

    def reads() -> int:
        with NodeClient(node.data, timeout_s=5.0) as client:
            return int(client.stats().get("hits", 0))

    return reads


def _mooncake() -> tuple[Any, str | None]:
    """The ``mooncake_peer`` module, or why Mooncake cannot run here."""
    try:
        import mooncake_peer  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        return None, f"benchmarks/mooncake_peer.py not importable: {exc}"
    reason = mooncake_peer.unavailable()
    return (mooncake_peer, None) if reason is None else (None, reason)


# ---------------------------------------------------------------------------- rounds


def _counters(system: System) -> dict[str, float]:
    assert system.sidecar is not None
    text = system.sidecar.admin.metrics_text()
    values = {
        "l2_hits": parse_metric_value(text, _L2_HITS),
        "l1_hits": parse_metric_value(text, _L1_HITS),
        "l2_stored": parse_metric_value(text, _L2_STORED),
    }
    if system.backend_reads is not None:
        values["backend_reads"] = float(system.backend_reads())
    return values


def run_round(system: System, requests: list[RequestSpec]) -> Round:
    """Store ``requests``, wait for L2, clear L1 (not for L1 only), retrieve and check every byte."""
    sidecar, wl = system.sidecar, system.workload
    assert sidecar is not None and wl is not None
    admin = sidecar.admin
    admin.clear_l1()  # the previous round's prefetched chunks must not make room scarce
    before = _counters(system)
    stored = wl.store_requests(requests)
    drain_s = sidecar.wait_store_drained(120.0)
    if not stored.ok:
        raise BenchError(f"{system.name}: stored {stored.chunks_stored} of {stored.chunks_attempted} chunks")
    admin.wait_events_settled(10.0)
    after_store = _counters(system)
    if system.adapter is not None:
        admin.clear_l1()
        left = admin.l1_object_count()
        if left:
            raise BenchError(f"{system.name}: {left} objects still in L1 after /cache/clear")
    got = wl.retrieve(requests)
    admin.wait_events_settled(10.0)
    after = _counters(system)
    if not got.ok:
        raise BenchError(
            f"{system.name}: {got.chunks_verified} of {got.chunks_requested} chunks verified "
            f"({got.mismatches} differ, {got.misses} missed, {got.retrieve_failures} failed)"
        )
    chunk_tokens = wl.chunk_size
    rnd = Round(
        tokens=got.chunks_retrieved * chunk_tokens,
        nbytes=got.bytes_retrieved,
        chunks=got.chunks_requested,
        store_s=stored.busy_s,
        store_l2_s=stored.elapsed_s - stored.fill_s - stored.pacing_wait_s + drain_s,
        retrieve_s=got.busy_s,
        l2_stored=int(after_store["l2_stored"] - before["l2_stored"]),
        l2_hits=int(after["l2_hits"] - after_store["l2_hits"]),
        l1_hits=int(after["l1_hits"] - after_store["l1_hits"]),
        backend_reads=(
            int(after["backend_reads"] - after_store["backend_reads"]) if "backend_reads" in after else None
        ),
        verified=got.chunks_verified,
        store_ms=stored.latency.p50_ms,
        lookup_ms=got.lookup_latency.p50_ms,
        retrieve_ms=got.retrieve_latency.p50_ms,
    )
    if system.adapter is not None and (rnd.l2_hits < rnd.chunks or rnd.l1_hits):
        raise BenchError(
            f"{system.name}: not every chunk came from L2 (L2 hits {rnd.l2_hits}, L1 hits {rnd.l1_hits}, "
            f"of {rnd.chunks})"
        )
    return rnd


# ---------------------------------------------------------------------------- profiling


@contextlib.contextmanager
def profiled(targets: dict[str, int], out_dir: Path, rate: int) -> Iterator[dict[str, Path]]:
    """``py-spy record`` of each pid (collapsed stacks, one file each) while the body runs."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists() and shutil.which(spy) is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    files = {name: out_dir / f"{name.replace(' ', '_')}.txt" for name in targets}
    procs = []
    for name, pid in targets.items():
        cmd = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--threads", "--nonblocking",
               "--output", str(files[name])]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        time.sleep(1.0)  # py-spy attaches
        yield files
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def summarize_profile(path: Path, top: int) -> list[str]:
    """Top functions of a collapsed-stack file: share of working samples (self, and anywhere on the stack)."""
    if not path.exists():
        return [f"  (no profile written to {path})"]
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = waiting = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames and frames[0].startswith("thread ("):
            thread, frames = frames[0], frames[1:]
        else:
            thread = "?"
        if frames and frames[-1].split(" (", 1)[0] not in _WAITS:
            threads[thread] += count
        total += count
        if not frames:
            continue
        if frames[-1].split(" (", 1)[0] in _WAITS:  # py-spy --nonblocking cannot always tell a wait from work
            waiting += count
            continue
        self_counts[_short(frames[-1])] += count
        for name in {_short(f) for f in frames}:
            incl_counts[name] += count
    total -= waiting
    if total <= 0:
        return ["  (no samples)"]
    lines = [
        f"  {total} working samples ({waiting} more in waits); by thread: "
        + ", ".join(f"{t} {c / total:.0%}" for t, c in threads.most_common(5))
    ]
    lines.append("  self (leaf) share:")
    lines += [f"    {c / total:6.1%}  {name}" for name, c in self_counts.most_common(top)]
    lines.append("  inclusive share (LMCache's and ours; runners left out):")
    ours = [(n, c) for n, c in incl_counts.most_common() if _OURS_OR_LMCACHE in n or "(lmcache_memkv/" in n]
    lines += [f"    {c / total:6.1%}  {name}" for name, c in ours[:top]]
    return lines


_OURS_OR_LMCACHE = "(lmcache/v1/"
# Leaf frames that are a thread waiting, not working. py-spy shows no frame for a C call, so the
# loops of LMCache's controllers (and grpc's spin thread), which wait in poll()/sleep(), are listed
# as themselves; their work shows up as deeper frames.
_WAITS = frozenset({"Condition.wait", "Event.wait", "EpollSelector.select", "Poller.poll", "Queue.get", "sleep",
                    "select", "poll", "epoll_wait", "wait", "PrefetchController._prefetch_loop",
                    "StoreController._store_loop", "L1EvictionController.eviction_loop",
                    "_run_channel_spin_thread.<locals>.channel_spin"})  # fmt: skip


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (lmcache/.../file.py)``: one name per function, not per line."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lmcache_memkv/", "benchmarks/"):
        if marker in where:
            where = where.split(marker, 1)[1] if marker == "site-packages/" else marker + where.split(marker, 1)[1]
            break
    return f"{name} ({where})"


# ---------------------------------------------------------------------------- report


def _fmt(values: list[float], digits: int) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} [{min(values):,.{digits}f}-{max(values):,.{digits}f}]"


def report(systems: list[System], skipped: dict[str, str], args: argparse.Namespace, l1_bytes: int) -> None:
    geo = KVGeometry()
    chunk_bytes = geo.chunk_bytes(args.chunk_tokens)
    print(
        f"sidecar end to end: {args.requests} requests x {args.tokens} tokens per round "
        f"({args.requests * (args.tokens // args.chunk_tokens)} chunks of {chunk_bytes // 1024} KiB), "
        f"L1 {l1_bytes // MIB} MiB, {args.repeat} interleaved rounds per system (median [min-max])"
    )
    print("store = client STOREs (SHM -> L1); store->L2 = until LMCache's write-behind is idle; "
          "retrieve = LOOKUP with L2 prefetch + RETRIEVE, every byte checked")  # fmt: skip
    print()
    header = (
        f"{'system':<16}{'store tok/s':>26}{'store GB/s':>22}{'store->L2 GB/s':>22}"
        f"{'retrieve tok/s':>26}{'retrieve GB/s':>22}{'vs L1 only':>12}"
    )
    print(header)
    ceiling = next((s for s in systems if s.adapter is None and s.rounds), None)
    ceiling_gbps = statistics.median(r.nbytes / r.retrieve_s / 1e9 for r in ceiling.rounds) if ceiling else 0.0
    for s in systems:
        if not s.rounds:
            continue
        rs = s.rounds
        store_tok = [r.tokens / r.store_s for r in rs]
        store_gb = [r.nbytes / r.store_s / 1e9 for r in rs]
        store_l2_gb = [r.nbytes / r.store_l2_s / 1e9 for r in rs]
        ret_tok = [r.tokens / r.retrieve_s for r in rs]
        ret_gb = [r.nbytes / r.retrieve_s / 1e9 for r in rs]
        ratio = f"{statistics.median(ret_gb) / ceiling_gbps:.2f}x" if ceiling_gbps else "-"
        l2_col = "-" if s.adapter is None else _fmt(store_l2_gb, 3)
        print(
            f"{s.name:<16}{_fmt(store_tok, 0):>26}{_fmt(store_gb, 3):>22}{l2_col:>22}"
            f"{_fmt(ret_tok, 0):>26}{_fmt(ret_gb, 3):>22}{ratio:>12}"
        )
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})")
    print()
    print(f"per request of {args.tokens} tokens, ms (median of the rounds' medians):")
    print(f"{'system':<16}{'STORE':>10}{'LOOKUP+prefetch':>18}{'RETRIEVE':>10}")
    for s in systems:
        if s.rounds:
            med = {
                k: statistics.median(getattr(r, k) for r in s.rounds) for k in ("store_ms", "lookup_ms", "retrieve_ms")
            }
            print(f"{s.name:<16}{med['store_ms']:>10.1f}{med['lookup_ms']:>18.1f}{med['retrieve_ms']:>10.1f}")
    print()
    print("where the retrieved chunks came from (sums over all rounds):")
    for s in systems:
        if not s.rounds:
            continue
        chunks = sum(r.chunks for r in s.rounds)
        reads = [r.backend_reads for r in s.rounds]
        backend = f", the L2's own reads {sum(x for x in reads if x is not None)}" if None not in reads else ""
        print(
            f"  {s.name}: {chunks} chunks requested, LMCache L2 hits {sum(r.l2_hits for r in s.rounds)}, "
            f"L1 hits {sum(r.l1_hits for r in s.rounds)}{backend}; written to L2 "
            f"{sum(r.l2_stored for r in s.rounds)}; byte-exact {sum(r.verified for r in s.rounds)}/{chunks}"
        )


# ---------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8, help="requests per round (default 8)")
    p.add_argument(
        "--tokens", type=int, default=4096, help="tokens per request, a multiple of 256 (default 4096 = 8 MiB)"
    )
    p.add_argument("--repeat", type=int, default=3, help="rounds per system, interleaved (default 3)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--no-l1-only", action="store_true", help="skip the L1-only reference")
    p.add_argument("--polling-lookup", action="store_true",
                   help="wait for prefetches as ServerBenchClient.lookup does (50 ms polls) instead of one blocking call")  # fmt: skip
    p.add_argument("--server-omp-threads", type=int, default=0,
                   help="OMP_NUM_THREADS for the lmcache servers (default: unset, torch's default)")  # fmt: skip
    p.add_argument(
        "--profile", default="", help="after the measured rounds, one more round of this system under py-spy"
    )
    p.add_argument("--profile-dir", type=Path, default=None, help="keep py-spy's collapsed stacks here")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--profile-rounds", type=int, default=3, help="rounds under py-spy")
    args = p.parse_args()
    args.chunk_tokens = 256
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(wanted) - set(SYSTEMS)
    if unknown or args.tokens % args.chunk_tokens or args.requests < 1 or args.repeat < 1:
        p.error(f"bad --systems {sorted(unknown)} / --tokens / --requests / --repeat")

    geo = KVGeometry()
    round_bytes = args.requests * args.tokens * geo.bytes_per_token()
    rounds_total = args.repeat + (1 if args.profile else 0)
    # L1 holds one round well below LMCache's eviction watermark (0.8): nothing is evicted or
    # dropped, so the L2 path alone decides where the chunks come from (L1 is cleared for that).
    l1_bytes = max(-(-round_bytes * 5 // 2 // MIB) * MIB, 32 * MIB)
    capacity = round_bytes * rounds_total * 3 // 2 + 64 * MIB
    config = WorkloadConfig(seed=11, max_tokens_per_request=args.tokens, pace_stores=False,
                            blocking_lookup=not args.polling_lookup)  # fmt: skip

    # SIGTERM (a test's timeout, a Ctrl-C'd parent) still runs the clean-up below.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    server_env = {"OMP_NUM_THREADS": str(args.server_omp_threads)} if args.server_omp_threads else {}
    systems: list[System] = []
    skipped: dict[str, str] = {}
    stoppers: list[Callable[[], None]] = []
    log_dir = Path(tempfile.mkdtemp(prefix="memkv-sidecar-e2e-"))
    ok = False
    try:
        if not args.no_l1_only:
            systems.append(System(L1_ONLY, None))
        if "memkv" in wanted:
            node = NodeProcess.start(capacity=str(capacity), metrics=False, log_dir=log_dir)
            stoppers.append(node.stop)
            if node.control is None:
                raise SystemExit("memkv node reported no control endpoint")
            systems.append(System("memkv", {"type": "memkv", "servers": node.control}, backend_reads=_node_reads(node),
                                  backend_pids={"memkv node": node.pid}))  # fmt: skip
        if "resp" in wanted:
            redis, port = start_redis(str(capacity))
            stoppers.append(lambda: _stop_proc(redis))
            systems.append(System("resp", {"type": "resp", "host": "127.0.0.1", "port": port},
                                  backend_reads=lambda: _redis_hits(port), backend_pids={"redis-server": redis.pid}))  # fmt: skip
        if "mooncake_store" in wanted:
            module, reason = _mooncake()
            if module is None:
                skipped["mooncake_store"] = reason or "unavailable"
            else:
                peer = module.MooncakePeer.start(capacity)
                stoppers.append(peer.stop)
                systems.append(System("mooncake_store", dict(peer.adapter), env=dict(peer.env),
                                      backend_pids=dict(peer.pids)))  # fmt: skip

        for s in systems:
            cfg = SidecarConfig(l2_adapters=[s.adapter] if s.adapter else [], l1_size_gb=l1_bytes / (1 << 30),
                                chunk_size=args.chunk_tokens, env={**s.env, **server_env})  # fmt: skip
            s.sidecar = SidecarProcess(cfg, log_dir=log_dir, ready_timeout_s=180.0)
            stoppers.append(s.sidecar.stop)
        # Side by side: each start spends seconds importing torch and LMCache, much of it waiting on disk.
        with ThreadPoolExecutor(len(systems)) as pool:
            for started in [pool.submit(s.sidecar.start) for s in systems if s.sidecar is not None]:
                started.result()
        for s in systems:
            assert s.sidecar is not None
            s.workload = Workload(s.sidecar, config)
            stoppers.append(s.workload.close)
            s.workload.connect()

        for rep in range(args.repeat):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            for s in order:
                assert s.workload is not None
                s.rounds.append(
                    run_round(s, s.workload.requests(args.requests, args.tokens, start_index=rep * args.requests))
                )
        report(systems, skipped, args, l1_bytes)

        if args.profile:
            target = next(
                (s for s in systems if s.name == args.profile or (args.profile == "l1" and s.adapter is None)), None
            )
            if target is None or target.sidecar is None or target.workload is None:
                raise SystemExit(f"--profile {args.profile}: not among the systems run")
            out = args.profile_dir or log_dir
            out.mkdir(parents=True, exist_ok=True)
            pids = {"lmcache server": target.sidecar.pid, "client (this process)": os.getpid()}
            first = args.repeat * args.requests
            with profiled(pids, out, args.profile_rate) as files:
                profiled_rounds = [
                    run_round(target, target.workload.requests(args.requests, args.tokens, first + i * args.requests))
                    for i in range(args.profile_rounds)
                ]
            nbytes = sum(r.nbytes for r in profiled_rounds)
            store_s, retrieve_s = sum(r.store_s for r in profiled_rounds), sum(r.retrieve_s for r in profiled_rounds)
            print()
            print(f"py-spy, {args.profile_rounds} more {target.name} rounds (store {nbytes / store_s / 1e9:.3f} GB/s, "
                  f"retrieve {nbytes / retrieve_s / 1e9:.3f} GB/s), working samples; stacks in {out}")  # fmt: skip
            for name, path in files.items():
                print(f"{name}:")
                print("\n".join(summarize_profile(path, 12)))
        ok = True
    finally:
        for stop in reversed(stoppers):
            with contextlib.suppress(Exception):
                stop()
        if ok and not args.profile_dir:
            shutil.rmtree(log_dir, ignore_errors=True)
        elif not ok:
            print(f"logs kept in {log_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
