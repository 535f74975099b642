"""``memkv bench``: LMCache's own ``lmcache bench l2`` against a MemKV cluster, in one table.

The benchmark is LMCache's, unchanged: it creates the memkv L2 adapter the way ``lmcache
server`` does, stores, looks up and loads ``in_flight x keys`` values per round, and compares the
last round's loaded bytes with what it stored (``--no-skip-verify``). This command picks the
defaults, checks the cluster answers first (a typo costs one line, not a torch import), shows
progress, and reads the figures back from the benchmark's JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.table import Table

HELP = "Benchmark a MemKV cluster with LMCache's own `lmcache bench l2` (store, lookup, load, byte-exact check)."
EXAMPLE = (
    "Example: memkv bench --servers 10.0.0.5:9901 --value-size 1MiB --keys 32 --in-flight 4 --rounds 5   "
    "(or MEMKV_SERVERS=...; the auth key comes from --auth-key-file / MEMKV_AUTH_KEY_FILE, else MEMKV_AUTH_KEY)"
)

_MIB = 1 << 20
_VERIFIED_RE = re.compile(r"All (\d+) keys data verified OK")
_MISMATCH_RE = re.compile(r"(\d+)/(\d+) keys have data mismatches")
_PROGRESS_RE = re.compile(r"\[(Store|Lookup|Load|Verify)\]")


@dataclass(frozen=True)
class BenchResult:
    store_gb_s: float
    lookup_keys_s: float
    load_gb_s: float
    ops: dict[str, dict[str, Any]]
    keys_checked: int
    keys_verified: int

    @property
    def all_succeeded(self) -> bool:
        return all(int(op["total_success"]) == int(op["total_keys"]) for op in self.ops.values())

    @property
    def ok(self) -> bool:
        return self.keys_checked > 0 and self.keys_verified == self.keys_checked and self.all_succeeded


def lmcache_executable() -> list[str]:
    """``lmcache`` of this interpreter's environment (module form as fallback)."""
    script = Path(sys.executable).with_name("lmcache")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmcache.cli.main"]


def parse_bench_output(report: dict[str, Any], output: str) -> BenchResult:
    """Figures from ``lmcache bench l2 --format json --output`` and the verification lines of its log."""
    metrics = report["metrics"]
    ops = {str(m["operation"]).lower(): m for k, m in metrics.items() if k.startswith("op_")}
    missing = {"store", "lookup", "load"} - set(ops)
    if missing:
        raise ValueError(f"lmcache bench l2 reported no {', '.join(sorted(missing))} results")
    checked = verified = 0
    if (m := _VERIFIED_RE.search(output)) is not None:
        checked = verified = int(m.group(1))
    elif (m := _MISMATCH_RE.search(output)) is not None:
        checked = int(m.group(2))
        verified = checked - int(m.group(1))
    # LMCache's "mbps" is MiB per second (bytes per round / 2**20 / seconds).
    return BenchResult(
        store_gb_s=float(ops["store"]["throughput_avg_mbps"]) * _MIB / 1e9,
        lookup_keys_s=float(ops["lookup"]["ops_per_sec_avg"]),
        load_gb_s=float(ops["load"]["throughput_avg_mbps"]) * _MIB / 1e9,
        ops=ops,
        keys_checked=checked,
        keys_verified=verified,
    )


def render_table(result: BenchResult, title: str) -> Table:
    from rich.table import Table

    table = Table(title=title)
    for column in ("operation", "throughput", "keys/s", "p50 ms/task", "p99 ms/task", "keys ok"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    rates = {"store": f"{result.store_gb_s:.2f} GB/s", "lookup": "-", "load": f"{result.load_gb_s:.2f} GB/s"}
    for name in ("store", "lookup", "load"):
        op = result.ops[name]
        good = int(op["total_success"]) == int(op["total_keys"])
        tally = f"{int(op['total_success']):,}/{int(op['total_keys']):,}"
        if int(op.get("rounds_timed_out", 0)):
            tally += f" ({op['rounds_timed_out']} rounds timed out)"
        table.add_row(
            name,
            rates[name],
            f"{float(op['ops_per_sec_avg']):,.0f}",
            f"{float(op['duration_p50_ms']):.2f}",
            f"{float(op['duration_p99_ms']):.2f}",
            tally if good else f"[red]{tally}[/red]",
        )
    table.add_section()
    verified = f"{result.keys_verified:,}/{result.keys_checked:,}"
    table.add_row(
        "byte-exact check",
        "",
        "",
        "",
        "",
        f"[green]{verified}[/green]" if result.ok else f"[red]{verified}[/red]",
    )
    table.caption = "keys verified: the last measured round, loaded bytes compared with stored bytes"
    return table


def bench(
    servers: Annotated[
        str,
        typer.Option(help="Control endpoints HOST:PORT, comma-separated; any one suffices.", envvar="MEMKV_SERVERS"),
    ] = "",
    value_size: Annotated[str, typer.Option(help="Size of each value, e.g. 256KiB or 1MiB (whole KiB).")] = "1MiB",
    keys: Annotated[int, typer.Option(help="Keys per submitted task.")] = 32,
    in_flight: Annotated[int, typer.Option(help="Tasks in flight per round.")] = 4,
    rounds: Annotated[int, typer.Option(help="Measured rounds per operation.")] = 5,
    warmup_rounds: Annotated[int, typer.Option(help="Unmeasured rounds first.")] = 1,
    adapter_json: Annotated[
        str, typer.Option(help="Extra memkv adapter fields as JSON, e.g. '{\"num_workers\": 8}'.")
    ] = "",
    auth_key_file: Annotated[
        str | None, typer.Option(help="File holding the 64-hex auth key (else MEMKV_AUTH_KEY; unset: no auth).", envvar="MEMKV_AUTH_KEY_FILE")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds the whole benchmark may take.")] = 600.0,
) -> None:
    from lmcache_memkv.cli.extras import require_lmcache
    from lmcache_memkv.cli.stats import UsageError, one_line, resolve_servers, wide_console

    require_lmcache("bench")
    from lmcache_memkv.sizes import format_size, parse_size

    try:
        endpoints, key = resolve_servers(servers, auth_key_file, "bench")
        try:
            value_bytes = parse_size(value_size)
        except ValueError as exc:
            raise UsageError(f"memkv bench: --value-size: {exc}") from None
        if value_bytes < 1024 or value_bytes % 1024:
            raise UsageError(f"memkv bench: --value-size must be a whole number of KiB, got {value_size}")
        for name, value, low in (("--keys", keys, 1), ("--in-flight", in_flight, 1), ("--rounds", rounds, 1)):
            if value < low:
                raise UsageError(f"memkv bench: {name} must be at least {low}, got {value}")
        if warmup_rounds < 0:
            raise UsageError(f"memkv bench: --warmup-rounds must be >= 0, got {warmup_rounds}")
        try:
            extra = json.loads(adapter_json) if adapter_json.strip() else {}
        except ValueError as exc:
            raise UsageError(f"memkv bench: --adapter-json is not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise UsageError("memkv bench: --adapter-json must be a JSON object")
    except UsageError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None

    members = _check_cluster(endpoints, key)
    capacity = sum(m.capacity_bytes for m in members if m.state == "ALIVE")
    alive = sum(m.state == "ALIVE" for m in members)
    stored_bytes = (rounds + warmup_rounds) * in_flight * keys * value_bytes
    console = wide_console()
    if stored_bytes > capacity:
        # Not fatal: with replicas or a growing cluster it may still fit, but LRU eviction would
        # turn loads into misses and fail the check, so say why up front.
        typer.echo(
            f"memkv bench: warning: the benchmark stores {format_size(stored_bytes)} but the cluster's live "
            f"capacity is {format_size(capacity)}; evicted keys will fail the load check (lower --rounds/--keys)",
            err=True,
        )

    adapter = {"type": "memkv", "servers": ",".join(endpoints), **extra}
    if auth_key_file:
        adapter["auth_key_file"] = str(Path(auth_key_file).resolve())
    with tempfile.TemporaryDirectory(prefix="memkv-bench-") as tmp:
        report_path = Path(tmp) / "bench.json"
        cmd = [
            *lmcache_executable(), "bench", "l2", "--l2-adapter", json.dumps(adapter),
            "--data-size-kb", str(value_bytes // 1024), "--num-keys", str(keys), "--in-flight", str(in_flight),
            "--rounds", str(rounds), "--warmup-rounds", str(warmup_rounds),
            "--no-skip-verify", "--lookup-max-hit-rate", "1.0", "--format", "json", "--output", str(report_path),
        ]  # fmt: skip
        started = time.monotonic()
        rc, output = _run(cmd, timeout, show_progress=not json_output)
        wall = time.monotonic() - started
        if rc != 0 and not report_path.exists():
            tail = "\n".join(output.splitlines()[-25:])
            typer.echo(f"memkv bench: lmcache bench l2 failed (exit {rc}); its last lines:\n{tail}", err=True)
            raise typer.Exit(1)
        try:
            result = parse_bench_output(json.loads(report_path.read_text()), output)
        except (OSError, ValueError, KeyError) as exc:
            typer.echo(f"memkv bench: cannot read lmcache bench l2's report: {one_line(str(exc))}", err=True)
            raise typer.Exit(1) from None

    summary = (
        f"{format_size(value_bytes).replace('.0 ', ' ')} values, {keys} keys/task, {in_flight} in flight, "
        f"{rounds} rounds (+{warmup_rounds} warm-up), --no-skip-verify"
    )
    if json_output:
        doc = {
            "ok": result.ok,
            "servers": endpoints,
            "members_alive": alive,
            "value_bytes": value_bytes,
            "keys_per_task": keys,
            "in_flight": in_flight,
            "rounds": rounds,
            "warmup_rounds": warmup_rounds,
            "store_gb_s": round(result.store_gb_s, 4),
            "lookup_keys_s": round(result.lookup_keys_s, 1),
            "load_gb_s": round(result.load_gb_s, 4),
            "keys_checked": result.keys_checked,
            "keys_verified": result.keys_verified,
            "wall_seconds": round(wall, 2),
            "operations": result.ops,
        }
        typer.echo(json.dumps(doc, indent=2))
    else:
        title = f"lmcache bench l2 on {alive} MemKV node{'s' if alive != 1 else ''}"
        console.print(f"[bold]memkv bench[/bold]: {summary}; {wall:.0f} s")
        console.print(render_table(result, title))
    if not result.ok:
        why = []
        if result.keys_verified != result.keys_checked or not result.keys_checked:
            why.append(f"{result.keys_verified} of {result.keys_checked} keys verified byte-exact")
        why += [
            f"{name}: {op['total_success']} of {op['total_keys']} keys succeeded"
            for name, op in result.ops.items()
            if int(op["total_success"]) != int(op["total_keys"])
        ]
        typer.echo(f"memkv bench: FAILED: {'; '.join(why)}", err=True)
        raise typer.Exit(1)


def _check_cluster(endpoints: list[str], key: bytes | None) -> list[Any]:
    """The view from the first endpoint that answers; one error line and exit 1 if none does."""
    from lmcache_memkv.cli.stats import one_line
    from lmcache_memkv.cluster.bootstrap import fetch_view
    from lmcache_memkv.control.channel import ChannelPool
    from lmcache_memkv.control.tls import ca_from_env
    from lmcache_memkv.errors import ConnectError

    pool = ChannelPool(key, ca_from_env())
    try:
        _, members, _ = fetch_view(pool, endpoints, 5.0)
    except ConnectError as exc:
        typer.echo(f"memkv bench: {one_line(str(exc))}", err=True)
        raise typer.Exit(1) from None
    finally:
        pool.close()
    return members


def _run(cmd: list[str], timeout_s: float, show_progress: bool) -> tuple[int, str]:
    """Run the benchmark, following its log on a spinner; (exit code, its whole output)."""
    env = dict(os.environ, LMCACHE_TRACK_USAGE="false", LMCACHE_DISABLE_BANNER="1", LMCACHE_LOG_LEVEL="WARNING")
    env.setdefault("PYTHONWARNINGS", "ignore")  # third-party FutureWarnings say nothing about MemKV
    # The bench zeroes its load buffers with torch before each timed round; torch's OpenMP workers
    # then spin through the round on a CPU the adapter needs (benchmarks/peers.py measured it).
    env.setdefault("OMP_NUM_THREADS", "1")
    lines: deque[str] = deque(maxlen=5000)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, text=True
    )
    status_line = ["starting lmcache bench l2 (loads torch and LMCache)"]

    def follow() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if _PROGRESS_RE.search(line):
                status_line[0] = line.strip()

    reader = threading.Thread(target=follow, name="memkv-bench-output", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    try:
        if show_progress:
            from rich.console import Console

            with Console(stderr=True).status(status_line[0]) as spinner:
                while proc.poll() is None and time.monotonic() < deadline:
                    spinner.update(f"lmcache bench l2: {status_line[0]}")
                    time.sleep(0.2)
        proc.wait(max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
        _stop(proc)
        typer.echo(f"memkv bench: lmcache bench l2 did not finish within {timeout_s:g}s (raise --timeout)", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _stop(proc)
        typer.echo("memkv bench: interrupted", err=True)
        raise typer.Exit(130) from None
    reader.join(5)
    return proc.returncode, "\n".join(lines)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
