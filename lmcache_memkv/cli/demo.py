"""``memkv demo``: the whole path on one machine, in about a minute, with every byte checked.

It starts a ``memkv node`` and an ``lmcache server`` whose L2 is that node and whose L1 is
deliberately tiny, drives LMCache's own CPU-mode MP client (the path ``LMCacheMPConnector``
takes) through more KV chunks than L1 can hold, then reads the earliest requests back: LMCache
has evicted them from L1, so they come from MemKV. Counters from LMCache, the adapter and the
node say where each chunk went; every retrieved byte is compared with what was stored.

No GPU, no RDMA, loopback only, free ports, a fresh auth key; everything is stopped at the
end, also on errors and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.table import Table

    from lmcache_memkv.node.launcher import NodeProcess
    from lmcache_memkv.sidecar.process import SidecarProcess
    from lmcache_memkv.sidecar.workload import ProgressEvent, RetrieveReport, StoreReport, Workload

HELP = (
    "Run MemKV end to end on this machine: a node, an lmcache server whose small L1 spills to it, every byte checked."
)
EXAMPLE = "Example: memkv demo   (about a minute on a laptop; no GPU or RDMA needed; --json for scripts)"

_CHUNK_TOKENS = 256  # the sidecar's chunk size: one chunk of the default geometry is 512 KiB
_L1_BYTES = 8 << 20  # 16 chunks; evicting half at half full, so 64 chunks must leave L1
_L1_WATERMARK = 0.5
_L1_EVICTION_RATIO = 0.5
_L1_HEADROOM = 0.75  # the workload waits for L1 room before each request (DESIGN.md section 8)
_SEED = 7
_NODE_ID = "memkv-demo"
_SIGINT_EXIT, _SIGTERM_EXIT = 130, 143  # the shell's 128 + signal number
_INTERRUPTED = (_SIGINT_EXIT, _SIGTERM_EXIT)

# LMCache and the adapter's counters on the sidecar's admin /metrics.
_L2_STORED_CHUNKS = "lmcache_mp_l2_store_completed_objects_chunks"
_L2_HIT_KEYS = "lmcache_mp_lookup_hit_l2_keys"
_L1_HIT_KEYS = "lmcache_mp_lookup_hit_l1_keys"
_L1_EVICTED_CHUNKS = "lmcache_mp_l1_evicted_chunks"
_ADAPTER_KEYS = "memkv_l2_keys"


class DemoError(RuntimeError):
    """The demo could not run (a part did not start, a bound passed); the message says which."""


class _Interrupted(BaseException):
    """SIGTERM, turned into an exception so the same clean-up runs as for Ctrl-C."""


class _OutOfTime(BaseException):
    """SIGALRM at ``--timeout``: every wait inside is bounded, but their sum could still be long."""


@dataclass
class Summary:
    """Everything the demo reports, as plain data (``--json`` prints it as is)."""

    ok: bool = False
    message: str = ""
    requests: int = 0
    tokens_per_request: int = 0
    chunk_bytes: int = 0
    chunks_per_request: int = 0
    l1_bytes: int = _L1_BYTES
    node_capacity_bytes: int = 0
    chunks_attempted: int = 0
    chunks_stored: int = 0
    chunks_dropped: int = 0
    chunks_spilled_to_memkv: int = 0
    adapter_keys_stored: int = 0
    node_keys: int = 0
    node_bytes: int = 0
    chunks_evicted_from_l1: int = 0
    requests_retrieved: int = 0
    chunks_requested: int = 0
    chunks_fetched_from_memkv: int = 0
    chunks_from_l1: int = 0
    node_reads: int = 0
    byte_checks_passed: int = 0
    byte_checks_failed: int = 0
    misses: int = 0
    store_mib_s: float = 0.0
    retrieve_mib_s: float = 0.0
    store_seconds: float = 0.0
    retrieve_seconds: float = 0.0
    startup_seconds: float = 0.0
    wall_seconds: float = 0.0
    node: dict[str, Any] = field(default_factory=dict)
    sidecar: dict[str, Any] = field(default_factory=dict)
    log_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = dict(self.__dict__)
        for name in ("store_mib_s", "retrieve_mib_s", "store_seconds", "retrieve_seconds"):
            doc[name] = round(doc[name], 2)
        doc["startup_seconds"] = round(self.startup_seconds, 2)
        doc["wall_seconds"] = round(self.wall_seconds, 2)
        return doc


def demo(
    requests: Annotated[int, typer.Option(help="Requests to store (each is tokens / 256 chunks of 512 KiB).")] = 16,
    tokens: Annotated[int, typer.Option(help="Tokens per request (a multiple of 256).")] = 1024,
    node_capacity: Annotated[str, typer.Option(help="The node's arena size.")] = "256MiB",
    log_dir: Annotated[
        Path | None, typer.Option(help="Write the node's, server's and client's logs here (kept).")
    ] = None,
    keep_logs: Annotated[bool, typer.Option("--keep-logs", help="Keep the logs (kept anyway on failure).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary instead of tables.")] = False,
    timeout: Annotated[
        int | None,
        typer.Option(help="Give up (and stop everything) after this many seconds [default: 300; 1800 with --vllm]."),
    ] = None,
    vllm: Annotated[
        bool,
        typer.Option(
            "--vllm",
            help="Real vLLM CPU workers on two 'hosts' instead: B reuses through MemKV the KV that A computed "
            "(needs vLLM's CPU build: `make test-vllm` creates .venv-vllm; minutes).",
        ),
    ] = False,
    prompts: Annotated[int, typer.Option(help="With --vllm: prompts each worker serves.")] = 3,
    layers: Annotated[int, typer.Option(help="With --vllm: layers of the random-weight Llama.")] = 8,
    hidden: Annotated[int, typer.Option(help="With --vllm: its hidden size (a multiple of 64).")] = 512,
) -> None:
    if vllm:
        from lmcache_memkv.cli.demo_vllm import run_vllm_demo

        if prompts < 1:
            typer.echo(f"memkv demo: --prompts must be at least 1, got {prompts}", err=True)
            raise typer.Exit(2)
        if timeout is not None and timeout < 60:
            typer.echo(f"memkv demo: --timeout must be at least 60 seconds with --vllm, got {timeout}", err=True)
            raise typer.Exit(2)
        # --tokens words per prompt (one token each); vLLM's start-up takes minutes on a small CPU.
        raise typer.Exit(run_vllm_demo(prompts, tokens, layers, hidden, log_dir, json_output, timeout or 1800))
    if timeout is None:
        timeout = 300
    from lmcache_memkv.cli.extras import require_lmcache

    require_lmcache("demo")
    from lmcache_memkv.sizes import parse_size

    try:
        if requests < 1:
            raise ValueError(f"--requests must be at least 1, got {requests}")
        if timeout < 10:
            raise ValueError(f"--timeout must be at least 10 seconds, got {timeout}")
        if tokens < _CHUNK_TOKENS or tokens % _CHUNK_TOKENS:
            raise ValueError(f"--tokens must be a positive multiple of {_CHUNK_TOKENS} (one chunk), got {tokens}")
        capacity = parse_size(node_capacity)
        chunk_bytes = _chunk_bytes()
        needed = requests * (tokens // _CHUNK_TOKENS) * chunk_bytes
        if needed > capacity:
            raise ValueError(
                f"--node-capacity {node_capacity} is smaller than the workload ({needed >> 20} MiB); "
                "the node would evict what the demo reads back"
            )
    except ValueError as exc:
        typer.echo(f"memkv demo: {exc}", err=True)
        raise typer.Exit(2) from None
    _quiet_lmcache()
    run = DemoRun(requests, tokens, capacity, chunk_bytes, log_dir, keep_logs, json_output, timeout)
    raise typer.Exit(run.execute())


def _chunk_bytes() -> int:
    # KVGeometry() of the workload: 4 layers x K/V x 2 heads x 64 x fp16 per token (no torch needed here).
    from lmcache_memkv.sidecar.workload import KVGeometry

    geo = KVGeometry()
    return _CHUNK_TOKENS * 2 * geo.num_layers * geo.num_heads * geo.head_size * 2


def _quiet_lmcache() -> None:
    """Before LMCache is imported: its INFO lines and telemetry would garble the progress display."""
    os.environ["LMCACHE_LOG_LEVEL"] = "WARNING"
    os.environ["LMCACHE_TRACK_USAGE"] = "false"
    os.environ["LMCACHE_DISABLE_BANNER"] = "1"
    # The demo is self-contained: an operator's MEMKV_* settings (servers, config file, replicas,
    # key) must not leak into its sidecar's adapter.
    for name in [n for n in os.environ if n.startswith("MEMKV_")]:
        del os.environ[name]
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


class DemoRun:
    def __init__(
        self,
        requests: int,
        tokens: int,
        capacity: int,
        chunk_bytes: int,
        log_dir: Path | None,
        keep_logs: bool,
        json_output: bool,
        timeout_s: int = 300,
    ) -> None:
        from lmcache_memkv.auth import new_key_hex

        self.requests = requests
        self.tokens = tokens
        self.capacity = capacity
        self.json = json_output
        self.timeout_s = timeout_s
        self.keep_logs = keep_logs or log_dir is not None
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="memkv-demo-"))
        self.key_hex = new_key_hex()  # a fresh key: the demo exercises authentication too
        self.summary = Summary(
            requests=requests,
            tokens_per_request=tokens,
            chunk_bytes=chunk_bytes,
            chunks_per_request=tokens // _CHUNK_TOKENS,
            node_capacity_bytes=capacity,
        )
        self.console = _make_console()
        self.node: NodeProcess | None = None
        self.sidecar: SidecarProcess | None = None
        self.workload: Workload | None = None
        self._client_log: TextIO | None = None
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    # ------------------------------------------------------------------ top level

    def execute(self) -> int:
        started = time.monotonic()
        previous_term = signal.signal(signal.SIGTERM, _raise_interrupted)
        # Also when started from a shell that ignores SIGINT for background jobs: the demo promises
        # that Ctrl-C / SIGINT stops it cleanly.
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        previous_alarm = signal.signal(signal.SIGALRM, _raise_out_of_time)
        outcome = 1
        try:
            signal.alarm(self.timeout_s)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._run()
            outcome = 0 if self.summary.ok else 1
        except KeyboardInterrupt:
            self.summary.message = "interrupted"
            outcome = _SIGINT_EXIT
        except _Interrupted:
            self.summary.message = "interrupted"
            outcome = _SIGTERM_EXIT
        except _OutOfTime:
            self.summary.message = f"did not finish within --timeout {self.timeout_s} s (logs in {self.log_dir})"
        except DemoError as exc:
            self.summary.message = str(exc)
        except Exception as exc:  # an unexpected failure still gets one readable line and a clean stop
            self.summary.message = f"{type(exc).__name__}: {_first_line(exc)} (logs in {self.log_dir})"
        finally:
            signal.alarm(0)
            self._cleanup(fast=outcome != 0)
            signal.signal(signal.SIGTERM, previous_term)
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGALRM, previous_alarm)
        self.summary.wall_seconds = time.monotonic() - started
        # A failure's logs explain it, so they stay; an interrupt's do not.
        keep = self.keep_logs or (outcome != 0 and outcome not in _INTERRUPTED)
        self.summary.log_dir = str(self.log_dir) if keep else None
        if not keep:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            for part in (self.summary.node, self.summary.sidecar):
                part.pop("log", None)  # gone with the directory
        self._report(outcome)
        return outcome

    def _run(self) -> None:
        s = self.summary
        t0 = time.monotonic()
        self._header()
        self._start_node()
        self._start_sidecar()
        self._connect()
        s.startup_seconds = time.monotonic() - t0
        self._store_and_retrieve()
        self._verdict()

    # ------------------------------------------------------------------ phases

    def _start_node(self) -> None:
        from lmcache_memkv.node.launcher import NodeProcess

        with self._step("starting memkv node") as done:
            try:
                self.node = NodeProcess.start(
                    capacity=str(self.capacity),
                    metrics=True,
                    args=["--node-id", _NODE_ID, "--drain-timeout", "5"],
                    env={"MEMKV_AUTH_KEY": self.key_hex},
                    log_dir=self.log_dir,
                    ready_timeout_s=30.0,
                    new_session=True,
                )
            except (OSError, RuntimeError, TimeoutError) as exc:
                raise DemoError(f"memkv node did not start: {_first_line(exc)} (log in {self.log_dir})") from None
            node = self.node
            if node.control is None:
                raise DemoError("memkv node reported no control endpoint (control plane missing?)")
            self.summary.node = {
                "node_id": node.node_id,
                "pid": node.pid,
                "data": node.data,
                "control": node.control,
                "metrics": node.metrics,
                "log": str(node.log_path),
            }
            done(f"memkv node [bold]{node.node_id}[/bold]: data {node.data}, control {node.control} "
                 f"({_size(self.capacity)} arena, pid {node.pid})")  # fmt: skip

    def _start_sidecar(self) -> None:
        from lmcache_memkv.sidecar.process import SidecarConfig, SidecarError, SidecarProcess

        assert self.node is not None and self.node.control is not None
        config = SidecarConfig(
            l2_adapters=[{"type": "memkv", "servers": self.node.control}],
            l1_size_gb=_L1_BYTES / (1 << 30),
            chunk_size=_CHUNK_TOKENS,
            eviction_trigger_watermark=_L1_WATERMARK,
            eviction_ratio=_L1_EVICTION_RATIO,
            env={"MEMKV_AUTH_KEY": self.key_hex, "LMCACHE_LOG_LEVEL": "INFO"},  # the server's log file stays useful
        )
        with self._step("starting lmcache server (loads torch and LMCache: 10-20 s)") as done:
            # Warm this process's imports meanwhile: the client needs torch and LMCache too.
            warm = threading.Thread(target=_import_client_side, name="memkv-demo-imports", daemon=True)
            warm.start()
            self.sidecar = SidecarProcess(config, log_dir=self.log_dir, ready_timeout_s=120.0)
            try:
                self.sidecar.start()
            except (SidecarError, OSError) as exc:
                raise DemoError(f"lmcache server did not start: {_first_line(exc)} (log in {self.log_dir})") from None
            sc = self.sidecar
            self.summary.sidecar = {
                "pid": sc.pid,
                "rpc": sc.rpc_url,
                "admin": sc.admin_url,
                "l1_bytes": _L1_BYTES,
                "log": str(sc.log_path),
            }
            done(f"lmcache server: MP {sc.rpc_url}, admin {sc.admin_url}, L1 {_size(_L1_BYTES)}, "
                 f"L2 adapter memkv -> {self.node.control} (pid {sc.pid})")  # fmt: skip
            warm.join()

    def _connect(self) -> None:
        from lmcache_memkv.sidecar.workload import Workload, WorkloadConfig

        assert self.sidecar is not None
        self._client_log = open(self.log_dir / "client.log", "a")  # closed in _cleanup
        client_log = self._client_log

        def log_line(text: str) -> None:
            client_log.write(text + "\n")

        config = WorkloadConfig(seed=_SEED, max_tokens_per_request=self.tokens, l1_headroom=_L1_HEADROOM)
        with self._step("connecting LMCache's CPU-mode MP client") as done:
            self.workload = Workload(self.sidecar, config, progress=self._on_progress, log=log_line)
            self.workload.connect()
            if self.workload.chunk_bytes != self.summary.chunk_bytes:  # the geometry is the workload's default
                self.summary.chunk_bytes = self.workload.chunk_bytes
            done(f"LMCache MP client: CPU KV cache in shared memory, {_size(self.summary.chunk_bytes)} chunks")

    def _store_and_retrieve(self) -> None:
        assert self.workload is not None and self.sidecar is not None and self.node is not None
        wl, admin = self.workload, self.sidecar.admin
        n_back = max(1, self.requests // 2)
        before = self._counters()
        with self._progress_bars():
            self._add_task("store", f"store {self.requests} requests", self.requests)
            stored = wl.store(self.requests, self.tokens)
            self.sidecar.wait_store_drained(60)
            admin.wait_events_settled(10)
            after_store = self._counters()
            self._add_task("retrieve", f"retrieve the earliest {n_back}", n_back)
            got = wl.retrieve(stored.requests[:n_back])
            admin.wait_events_settled(10)
        after = self._counters()
        self._record(stored, got, before, after_store, after)

    def _record(
        self,
        stored: StoreReport,
        got: RetrieveReport,
        before: dict[str, float],
        after_store: dict[str, float],
        after: dict[str, float],
    ) -> None:
        s = self.summary
        s.chunks_attempted = stored.chunks_attempted
        s.chunks_stored = stored.chunks_stored
        s.chunks_dropped = stored.chunks_dropped
        s.chunks_spilled_to_memkv = int(after_store["l2_stored"] - before["l2_stored"])
        s.adapter_keys_stored = int(after_store["adapter_stored"] - before["adapter_stored"])
        s.node_keys = int(after_store["node_keys"])
        s.node_bytes = int(after_store["node_bytes"])
        s.chunks_evicted_from_l1 = int(after_store["l1_evicted"] - before["l1_evicted"])
        s.requests_retrieved = len(got.requests)
        s.chunks_requested = got.chunks_requested
        s.chunks_fetched_from_memkv = int(after["l2_hits"] - after_store["l2_hits"])
        s.chunks_from_l1 = int(after["l1_hits"] - after_store["l1_hits"])
        s.node_reads = int(after["node_reads"] - after_store["node_reads"])
        s.byte_checks_passed = got.chunks_verified
        s.byte_checks_failed = got.mismatches
        s.misses = got.misses + got.retrieve_failures
        s.store_mib_s = stored.throughput_mib_s
        s.store_seconds = stored.elapsed_s
        s.retrieve_mib_s = got.throughput_mib_s
        s.retrieve_seconds = got.elapsed_s

    def _verdict(self) -> None:
        s = self.summary
        problems = []
        if s.byte_checks_failed:
            problems.append(f"{s.byte_checks_failed} retrieved chunks differ from what was stored")
        if s.misses:
            problems.append(f"{s.misses} of {s.chunks_requested} chunks did not come back")
        if s.byte_checks_passed != s.chunks_requested and not problems:
            problems.append(f"only {s.byte_checks_passed} of {s.chunks_requested} chunks were verified")
        if s.chunks_fetched_from_memkv <= 0:
            problems.append(
                "no chunk came back from MemKV (the workload fit in LMCache's L1; raise --requests or --tokens)"
            )
        if s.chunks_dropped:
            problems.append(f"LMCache dropped {s.chunks_dropped} chunks at store time (L1 full)")
        s.ok = not problems
        if s.ok:
            s.message = (
                f"{s.chunks_fetched_from_memkv} chunks came back from MemKV and all {s.byte_checks_passed} "
                "retrieved chunks matched byte for byte"
            )
        else:
            s.message = "; ".join(problems)

    # ------------------------------------------------------------------ counters

    def _counters(self) -> dict[str, float]:
        from lmcache_memkv.client import NodeClient
        from lmcache_memkv.sidecar.process import parse_metric_value

        assert self.sidecar is not None and self.node is not None
        text = self.sidecar.admin.metrics_text()
        with NodeClient(self.node.data, key=bytes.fromhex(self.key_hex), timeout_s=5.0) as client:
            node = client.stats()
        return {
            "l2_stored": parse_metric_value(text, _L2_STORED_CHUNKS),
            "adapter_stored": parse_metric_value(text, _ADAPTER_KEYS, {"op": "store", "outcome": "stored"}),
            "l2_hits": parse_metric_value(text, _L2_HIT_KEYS),
            "l1_hits": parse_metric_value(text, _L1_HIT_KEYS),
            "l1_evicted": parse_metric_value(text, _L1_EVICTED_CHUNKS),
            "node_keys": float(node.get("keys", 0)),
            "node_bytes": float(node.get("value_bytes", 0)),
            "node_reads": float(node.get("hits", 0)),
        }

    # ------------------------------------------------------------------ clean-up

    def _cleanup(self, fast: bool) -> None:
        """Stop the client, the server and the node, in that order; bounded, and deaf to a second Ctrl-C."""
        ignored = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        started = time.monotonic()
        anything = self.node is not None or self.sidecar is not None
        if anything and not self.json and fast:
            self.console.print("[dim]stopping the lmcache server and the memkv node ...[/dim]")
        try:
            workload, self.workload = self.workload, None
            if workload is not None:
                # The client's goodbye is an RPC; if the interrupt caught it mid-call, do not wait forever.
                closer = threading.Thread(target=_close_quietly, args=(workload,), name="memkv-demo-close", daemon=True)
                closer.start()
                closer.join(5.0 if fast else 15.0)
            if self.sidecar is not None:
                with contextlib.suppress(Exception):
                    self.sidecar.stop(timeout_s=10.0 if fast else 20.0)
            if self.node is not None:
                with contextlib.suppress(Exception):
                    self.node.stop(timeout_s=5.0 if fast else 10.0)
            _unlink_own_shm()
            if self._client_log is not None:
                self._client_log.close()
                self._client_log = None
            if anything and not self.json:
                self.console.print(
                    f"[green]✓[/green] stopped the client, the lmcache server and the memkv node "
                    f"[dim]({time.monotonic() - started:.1f} s)[/dim]"
                )
        finally:
            for sig, handler in ignored.items():
                signal.signal(sig, handler)

    # ------------------------------------------------------------------ display

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[Callable[[str], None]]:
        """A spinner while ``what`` runs; the body calls ``done(text)`` for the tick line."""
        started = time.monotonic()
        lines: list[str] = []
        if self.json:
            yield lines.append
            return
        with self.console.status(f"{what} ..."):
            yield lines.append
        for text in lines:
            self.console.print(f"[green]✓[/green] {text} [dim]({time.monotonic() - started:.1f} s)[/dim]")

    @contextlib.contextmanager
    def _progress_bars(self) -> Iterator[None]:
        if self.json:
            yield
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("[bold]{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
        ) as progress:
            self._progress = progress
            try:
                yield
            finally:
                self._progress = None

    def _add_task(self, op: str, description: str, total: int) -> None:
        if self._progress is not None:
            self._tasks[op] = self._progress.add_task(description, total=total, info="")

    def _on_progress(self, event: ProgressEvent) -> None:
        progress, task = self._progress, self._tasks.get(event.op)
        if progress is None or task is None:
            return
        chunks = event.done * event.chunks
        info = (
            f"{chunks} chunks" if event.ok else f"{chunks} chunks, [red]request {event.request.index} incomplete[/red]"
        )
        progress.update(task, completed=event.done, info=info)

    def _header(self) -> None:
        if self.json:
            return
        s = self.summary
        total = self.requests * s.chunks_per_request
        self.console.print(
            f"[bold]MemKV demo[/bold]: {self.requests} requests x {self.tokens} tokens = {total} KV chunks "
            f"of {_size(s.chunk_bytes)} ({_size(total * s.chunk_bytes)}) through an LMCache L1 of "
            f"{_size(_L1_BYTES)}; what does not fit goes to MemKV."
        )

    def _report(self, outcome: int) -> None:
        s = self.summary
        if self.json:
            typer.echo(json.dumps(s.to_json(), indent=2))
            if outcome != 0:
                typer.echo(f"memkv demo: {s.message}", err=True)
            return
        if outcome in _INTERRUPTED:
            typer.echo("memkv demo: interrupted; everything it started has been stopped", err=True)
            return
        if s.chunks_attempted:
            self.console.print(self._table())
        if outcome == 0:
            self.console.print(f"[bold green]PASS[/bold green]: {s.message} ({s.wall_seconds:.0f} s in all).")
        else:
            self.console.print(f"[bold red]FAIL[/bold red]: {s.message}")
            typer.echo(f"memkv demo: failed: {s.message}", err=True)
        if s.log_dir:
            self.console.print(f"[dim]logs kept in {s.log_dir}[/dim]")

    def _table(self) -> Table:
        from rich.table import Table

        s = self.summary
        table = Table(title="MemKV demo summary", show_header=False, title_justify="left")
        table.add_column("what", style="bold")
        table.add_column("result")
        check = f"{s.byte_checks_passed} passed, {s.byte_checks_failed} failed"
        if s.misses:
            check += f", {s.misses} missed"
        rows = [
            ("chunks stored", f"{s.chunks_stored} of {s.chunks_attempted} ({_size(s.chunks_stored * s.chunk_bytes)})"),
            (
                "spilled to MemKV",
                f"{s.chunks_spilled_to_memkv} chunks (LMCache L2 stores); adapter stored {s.adapter_keys_stored} keys; "
                f"node holds {s.node_keys} keys ({_size(s.node_bytes)})",
            ),
            ("evicted from L1", f"{s.chunks_evicted_from_l1} chunks (L1 holds {_size(_L1_BYTES)})"),
            (
                "retrieved",
                f"the earliest {s.requests_retrieved} request{'s' if s.requests_retrieved != 1 else ''} "
                f"= {s.chunks_requested} chunks",
            ),
            (
                "fetched back from MemKV",
                f"{s.chunks_fetched_from_memkv} chunks (LMCache L2 hits); node served {s.node_reads} reads; "
                f"{s.chunks_from_l1} from L1",
            ),
            ("byte-exact checks", f"[green]{check}[/green]" if s.ok else f"[red]{check}[/red]"),
            (
                "store throughput",
                f"{s.store_mib_s:,.1f} MiB/s ({s.requests} requests in {s.store_seconds:.1f} s, "
                "incl. waits for LMCache's L1 write-behind)",
            ),
            ("retrieve throughput", f"{s.retrieve_mib_s:,.1f} MiB/s ({s.retrieve_seconds:.1f} s)"),
            (
                "memkv node",
                f"{s.node.get('node_id')} pid {s.node.get('pid')}: data {s.node.get('data')}, "
                f"control {s.node.get('control')}, metrics http://{s.node.get('metrics')}/metrics",
            ),
            (
                "lmcache server",
                f"pid {s.sidecar.get('pid')}: MP {s.sidecar.get('rpc')}, admin {s.sidecar.get('admin')}",
            ),
        ]
        for what, result in rows:
            table.add_row(what, result)
        table.caption = (
            "Throughputs are end to end through LMCache's CPU-mode client on this machine; "
            "`memkv bench` measures the MemKV data path itself."
        )
        table.caption_justify = "left"
        return table


def _make_console() -> Console:
    from lmcache_memkv.cli.stats import wide_console

    return wide_console()


def _import_client_side() -> None:
    with contextlib.suppress(Exception):  # only a head start: the real import reports any problem
        import lmcache.cli.commands.bench.server_bench.client  # noqa: F401
        import torch  # noqa: F401


def _close_quietly(workload: Workload) -> None:
    with contextlib.suppress(Exception):
        workload.close()


def _unlink_own_shm() -> None:
    """Remove KV segments this process created and could not release (e.g. interrupted mid-connect).

    LMCache names them ``lmcache_kv_<creator pid>_<n>``, so only our own are touched.
    """
    prefix = f"lmcache_kv_{os.getpid()}_"
    with contextlib.suppress(OSError):
        for entry in Path("/dev/shm").iterdir():
            if entry.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    entry.unlink()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted()


def _raise_out_of_time(signum: int, frame: FrameType | None) -> None:
    raise _OutOfTime()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _size(n: float) -> str:
    from lmcache_memkv.sizes import format_size

    return format_size(n).replace(".0 ", " ")
