"""``memkv demo --vllm``: KV computed by one real vLLM worker reused by another through MemKV.

Two MemKV nodes (``replicas: 2``), two "hosts" each made of an ``lmcache server`` sidecar with
the memkv adapter and a vLLM CPU worker with ``LMCacheMPConnector``, and a third vLLM worker
with no KV connector for reference. Worker A serves a few long prompts (it computes them and its
sidecar writes the KV through to MemKV); worker B, whose sidecar never saw them, serves the same
prompts. The three serve each prompt in turn (no cache, A, B), after one warm-up request each,
so the times of one prompt were taken under about the same load. The report shows, per worker,
the prompt tokens it computed, those it got from MemKV, the time of each request, and whether
every output equals the no-cache worker's.

Needs vLLM's CPU build in the same environment (``make test-vllm`` creates ``.venv-vllm``); the
model is a random-weight Llama written on the spot, so nothing is downloaded. Loopback
only; every process is stopped at the end, also on errors and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmcache_memkv.node.launcher import NodeProcess
    from lmcache_memkv.sidecar.process import SidecarProcess
    from lmcache_memkv.sidecar.vllm_worker import VllmWorker

_CHUNK_TOKENS = 256
_SIGTERM_EXIT = 143


class _Interrupted(BaseException):
    """SIGTERM, raised so the same clean-up runs as for Ctrl-C."""


class _OutOfTime(BaseException):
    """SIGALRM at ``--timeout``."""


@dataclass
class WorkerReport:
    """One worker's share: what it computed, what it was handed, how long each request took."""

    name: str
    role: str
    requests: int = 0
    prompt_tokens: int = 0
    tokens_from_memkv: int = 0
    request_ms: list[float] = field(default_factory=list)
    outputs_match_no_cache: bool = True

    @property
    def tokens_computed(self) -> int:
        return self.prompt_tokens - self.tokens_from_memkv

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["tokens_computed"] = self.tokens_computed
        doc["request_ms"] = [round(ms, 1) for ms in self.request_ms]
        return doc


@dataclass
class VllmSummary:
    ok: bool = False
    message: str = ""
    prompts: int = 0
    words_per_prompt: int = 0
    chunk_tokens: int = _CHUNK_TOKENS
    layers: int = 0
    hidden: int = 0
    workers: list[WorkerReport] = field(default_factory=list)
    sidecar_b_l2_hit_chunks: float = 0.0
    adapter_b_loaded_bytes: float = 0.0
    startup_seconds: float = 0.0
    wall_seconds: float = 0.0
    log_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {k: v for k, v in self.__dict__.items() if k != "workers"}
        doc["workers"] = [w.to_json() for w in self.workers]
        doc["startup_seconds"] = round(self.startup_seconds, 1)
        doc["wall_seconds"] = round(self.wall_seconds, 1)
        return doc


class VllmDemo:
    def __init__(
        self,
        prompts: int,
        words: int,
        layers: int,
        hidden: int,
        log_dir: Path | None,
        json_output: bool,
        timeout_s: int,
    ) -> None:
        self.prompts = prompts
        self.words = words
        self.layers = layers
        self.hidden = hidden
        # fp32 keys and values of every layer; each sidecar's L1 holds about one pass over the
        # prompts (LMCache writes through to MemKV, and B's L1 never sees A's chunks anyway).
        self.chunk_bytes = _CHUNK_TOKENS * 2 * layers * hidden * 4
        self.bytes_needed = prompts * (words // _CHUNK_TOKENS + 1) * self.chunk_bytes
        self.json = json_output
        self.timeout_s = timeout_s
        self.keep_logs = log_dir is not None
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="memkv-demo-vllm-"))
        self.summary = VllmSummary(prompts=prompts, words_per_prompt=words, layers=layers, hidden=hidden)
        self.nodes: list[NodeProcess] = []
        self.sidecars: list[SidecarProcess] = []
        self.workers: list[VllmWorker] = []

    def execute(self) -> int:
        from rich.console import Console

        console = Console(stderr=self.json)
        if not console.is_terminal:
            console = Console(stderr=self.json, width=100)  # a log file: rich's 80 columns would wrap the table
        started = time.monotonic()
        previous_term = signal.signal(signal.SIGTERM, _raise_interrupted)
        previous_alarm = signal.signal(signal.SIGALRM, _raise_out_of_time)
        outcome = 1
        try:
            signal.alarm(self.timeout_s)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._run(console)
            outcome = 0 if self.summary.ok else 1
        except KeyboardInterrupt:
            self.summary.message, outcome = "interrupted", 130
        except _Interrupted:
            self.summary.message, outcome = "interrupted", _SIGTERM_EXIT
        except _OutOfTime:
            self.summary.message = f"did not finish within --timeout {self.timeout_s} s (logs in {self.log_dir})"
        except Exception as exc:  # one readable line, and everything stopped
            self.summary.message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            signal.alarm(0)
            self._cleanup()
            signal.signal(signal.SIGTERM, previous_term)
            signal.signal(signal.SIGALRM, previous_alarm)
        self.summary.wall_seconds = time.monotonic() - started
        keep = self.keep_logs or outcome not in (0, 130, _SIGTERM_EXIT)
        self.summary.log_dir = str(self.log_dir) if keep else None
        if not keep:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        self._report(console, outcome)
        return outcome

    # ------------------------------------------------------------------ phases

    def _run(self, console: Any) -> None:
        from lmcache_memkv.auth import new_key_hex
        from lmcache_memkv.sidecar.vllm_worker import make_tiny_llama, word_prompts

        t0 = time.monotonic()
        key = new_key_hex()
        what = f"writing a random-weight Llama ({self.layers} layers, hidden {self.hidden}) and its tokenizer (offline)"
        with self._step(console, what):
            model = make_tiny_llama(
                self.log_dir / "model", layers=self.layers, hidden=self.hidden, heads=max(1, self.hidden // 64)
            )
        with self._step(console, "starting two memkv nodes"):
            self._node(key)
            first = self.nodes[0].control
            assert first is not None
            self._node(key, "--seed", first)
        with self._step(console, "starting two lmcache servers (one per host), memkv adapter, replicas 2"):
            with ThreadPoolExecutor(2) as pool:
                side_a, side_b = pool.map(lambda _: self._sidecar(key, first), range(2))
        with self._step(console, "starting three vLLM CPU workers: A, B and one with no cache (minutes)"):
            plain, worker_a, worker_b = self._workers(model, [None, side_a, side_b])
        self.summary.startup_seconds = time.monotonic() - t0

        seed = int(time.time())
        prompts = word_prompts(self.prompts, self.words, seed=seed)
        with self._step(console, "one short warm-up request per worker (under one chunk: nothing cached)"):
            warm_up = word_prompts(1, _CHUNK_TOKENS // 4, seed=seed + 1)[0]
            for worker in (plain, worker_a, worker_b):
                worker.complete(warm_up)
        plan = [
            WorkerReport("no cache", "recomputes every prompt"),
            WorkerReport("A", "host 1: computes, its sidecar writes the KV to MemKV"),
            WorkerReport("B", "host 2: its sidecar never saw the prompts"),
        ]
        self.summary.workers = plan
        b_before = (side_b.metric("lmcache_mp_lookup_hit_l2_keys"), side_b.metric("memkv_l2_bytes", direction="load"))
        # Interleaved, prompt by prompt: on a shared machine the three requests of one prompt see
        # about the same load, so their times compare better than three separate passes would.
        with self._step(console, "each prompt: the no-cache worker, then A, then B (B's KV comes from MemKV)"):
            for prompt in prompts:
                reference = self._serve(plan[0], plain, prompt, None)
                self._serve(plan[1], worker_a, prompt, reference)
                side_a.wait_store_drained(120)  # A's chunks are in MemKV before B asks
                self._serve(plan[2], worker_b, prompt, reference)
        side_b.admin.wait_events_settled()
        self.summary.sidecar_b_l2_hit_chunks = side_b.metric("lmcache_mp_lookup_hit_l2_keys") - b_before[0]
        self.summary.adapter_b_loaded_bytes = side_b.metric("memkv_l2_bytes", direction="load") - b_before[1]
        a, b = self.summary.workers[1], self.summary.workers[2]
        same = all(w.outputs_match_no_cache for w in self.summary.workers)
        self.summary.ok = same and b.tokens_from_memkv > 0 and a.tokens_from_memkv == 0
        if not same:
            self.summary.message = "an output differs from the no-cache worker's"
        elif b.tokens_from_memkv == 0:
            self.summary.message = "worker B got no tokens from MemKV"
        else:
            self.summary.message = (
                f"worker B got {b.tokens_from_memkv} of {b.prompt_tokens} prompt tokens from MemKV; "
                "every output equals the no-cache worker's"
            )

    def _node(self, key: str, *args: str) -> None:
        from lmcache_memkv.node.launcher import NodeProcess

        node = NodeProcess.start(
            capacity=str(max(64 << 20, 2 * self.bytes_needed)),
            args=list(args),
            env={"MEMKV_AUTH_KEY": key},
            log_dir=self.log_dir,
            new_session=True,
        )
        self.nodes.append(node)

    def _sidecar(self, key: str, servers: str) -> SidecarProcess:
        from lmcache_memkv.sidecar.process import SidecarConfig, SidecarProcess

        config = SidecarConfig(
            l2_adapters=[{"type": "memkv", "servers": servers, "replicas": 2}],
            l1_size_gb=max(16 << 20, 2 * self.bytes_needed) / (1 << 30),
            chunk_size=_CHUNK_TOKENS,
            # vLLM's CPU worker registers its KV cache engine-driven; LMCache's default is lmcache-driven only.
            supported_transfer_mode="auto",
            env={"MEMKV_AUTH_KEY": key},
        )
        sidecar = SidecarProcess(config, log_dir=self.log_dir, ready_timeout_s=300)
        self.sidecars.append(sidecar)
        return sidecar.start()

    def _workers(self, model: Any, sidecars: Sequence[SidecarProcess | None]) -> list[VllmWorker]:
        from lmcache_memkv.sidecar.vllm_worker import VllmWorker, WorkerConfig

        started = [
            VllmWorker(WorkerConfig(model, sidecar_url=s.rpc_url if s else None), log_dir=self.log_dir)
            for s in sidecars
        ]
        self.workers.extend(started)
        pool = ThreadPoolExecutor(len(started))
        try:
            return list(pool.map(lambda w: w.start(), started))
        except BaseException:
            for worker in started:  # ends the other threads' start-up waits
                worker.stop(timeout_s=5.0)
            raise
        finally:
            pool.shutdown(wait=True)

    def _serve(self, report: WorkerReport, worker: VllmWorker, prompt: str, reference: str | None) -> str:
        """One request; the worker's external-hit counter says how many prompt tokens it did not compute."""
        from lmcache_memkv.sidecar.vllm_worker import EXTERNAL_HITS

        hits = worker.metric(EXTERNAL_HITS)
        done = worker.complete(prompt)
        report.requests += 1
        report.prompt_tokens += done.prompt_tokens
        report.tokens_from_memkv += int(worker.metric(EXTERNAL_HITS) - hits)
        report.request_ms.append(done.seconds * 1000)
        if reference is not None and done.text != reference:
            report.outputs_match_no_cache = False
        return done.text

    def _cleanup(self) -> None:
        for worker in reversed(self.workers):
            with contextlib.suppress(Exception):
                worker.stop()
        for sidecar in reversed(self.sidecars):
            with contextlib.suppress(Exception):
                sidecar.stop()
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                node.stop()

    # ------------------------------------------------------------------ output

    @contextlib.contextmanager
    def _step(self, console: Any, what: str) -> Iterator[None]:
        started = time.monotonic()
        console.print(f"[dim]..[/dim] {what}")
        yield
        console.print(f"[green]ok[/green] {what} [dim]({time.monotonic() - started:.1f} s)[/dim]")

    def _report(self, console: Any, outcome: int) -> None:
        if self.json:
            print(json.dumps(self.summary.to_json(), indent=2))
            return
        from rich.table import Table

        s = self.summary
        table = Table(
            title=f"{s.prompts} prompts x {s.words_per_prompt} tokens; Llama {s.layers} layers x {s.hidden} (random weights)"
        )
        for col in ("worker", "prompt tokens", "computed", "from MemKV", "request ms", "median ms", "same output"):
            table.add_column(col, justify="left" if col in ("worker", "request ms") else "right")
        for w in s.workers:
            ms = " ".join(f"{m:.0f}" for m in w.request_ms)
            median = f"{statistics.median(w.request_ms):.0f}" if w.request_ms else "-"
            same = "-" if w.name == "no cache" else ("yes" if w.outputs_match_no_cache else "NO")
            cells = (str(w.prompt_tokens), str(w.tokens_computed), str(w.tokens_from_memkv), ms, median, same)
            table.add_row(w.name, *cells)
        if s.workers:
            console.print(table)
            console.print(
                f"B's sidecar: {s.sidecar_b_l2_hit_chunks:.0f} chunks hit in L2 (MemKV), "
                f"{s.adapter_b_loaded_bytes / (1 << 20):.1f} MiB loaded by the memkv adapter; "
                f"start-up {s.startup_seconds:.0f} s, whole demo {s.wall_seconds:.0f} s"
            )
        colour = "green" if outcome == 0 else "red"
        console.print(f"[{colour}]{'PASS' if outcome == 0 else 'FAIL'}[/{colour}] {s.message}")
        if s.log_dir:
            console.print(f"logs: {s.log_dir}")


def run_vllm_demo(
    prompts: int, words: int, layers: int, hidden: int, log_dir: Path | None, json_output: bool, timeout_s: int
) -> int:
    """The ``--vllm`` mode of ``memkv demo``; returns the exit code."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print(
            "memkv demo --vllm needs vLLM's CPU build in this environment: `make test-vllm` in a checkout "
            "creates .venv-vllm; then run .venv-vllm/bin/memkv demo --vllm",
            file=sys.stderr,
        )
        return 2
    if hidden % 64 or hidden < 64 or layers < 1:
        print(
            "memkv demo: --hidden must be a positive multiple of 64 (heads of 64) and --layers at least 1",
            file=sys.stderr,
        )
        return 2
    return VllmDemo(prompts, words, layers, hidden, log_dir, json_output, timeout_s).execute()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted()


def _raise_out_of_time(signum: int, frame: FrameType | None) -> None:
    raise _OutOfTime()
