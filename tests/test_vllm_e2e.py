"""Real vLLM workers on two "hosts": KV computed on one is served to the other through MemKV.

Three real ``memkv node`` processes (``replicas: 2``), two real ``lmcache server`` sidecars with
the memkv adapter and their own small L1, two vLLM CPU workers with ``LMCacheMPConnector``, one
per sidecar, and a third vLLM worker with no KV connector at all for the reference outputs. The
model is a tiny random-weight Llama the test writes itself (nothing is downloaded).

Runs only where vLLM is importable: ``make test-vllm`` builds that environment (``.venv-vllm``).
Start-up of one worker takes minutes on a busy two-core machine, so this is not in ``make test``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("real vLLM tests: `make test-vllm` builds their environment and runs them", allow_module_level=True)

from cluster_util import wait_until
from nodeproc import NodeProcess, memkv_command, node_env

from lmcache_memkv.sidecar.process import SidecarConfig, SidecarProcess
from lmcache_memkv.sidecar.vllm_worker import (
    EXTERNAL_HITS,
    Completion,
    TinyModel,
    VllmWorker,
    WorkerConfig,
    make_tiny_llama,
    word_prompts,
)

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(1800),
    pytest.mark.filterwarnings("ignore:.*LoggingHandler.*:DeprecationWarning"),
]

CHUNK = 256  # the sidecar's --chunk-size; each prompt spans several chunks
PROMPT_WORDS = 3 * CHUNK + 40  # one token per word: three full chunks and a tail
MAX_TOKENS = 8
L1_GB = 16 / 1024  # 16 MiB per sidecar: its own small L1 (a 256-token chunk is 512 KiB here)
L2_HIT_KEYS = "lmcache_mp_lookup_hit_l2_keys"
L1_HIT_KEYS = "lmcache_mp_lookup_hit_l1_keys"
L2_HIT_TOKENS = "lmcache_mp_lookup_hit_l2_tokens"
# Membership timings for nodes that share two cores with three vLLM workers: a node that stalls
# longer than peers wait before declaring it DEAD drops its data (self-fencing, by design), and
# the tests' usual sub-second timings (cluster_util.FAST_ARGS) let a busy moment do that here.
NODE_ARGS = ["--heartbeat-interval", "1", "--suspect-after", "5", "--dead-after", "10"]
HEARTBEAT_S = 2.0  # the connector's ping interval, so a restarted sidecar is found again soon
# What LMCache's vLLM connector logs when its sidecar goes away and when it is back.
DEGRADED = "LMCache server is unhealthy"
RESUMED = "LMCache server is healthy again — resuming normal operation"

REUSE = word_prompts(3, PROMPT_WORDS, seed=1)
FAULT = word_prompts(3, PROMPT_WORDS, seed=2)


def cacheable(done: Sequence[Completion]) -> int:
    """Prompt tokens vLLM can take from LMCache: its whole chunks, short of the last token (always computed)."""
    return sum(min(c.prompt_tokens // CHUNK * CHUNK, c.prompt_tokens - 1) for c in done)


def chunks(done: Sequence[Completion]) -> int:
    """Whole chunks of the prompts: what LMCache stores and looks up."""
    return sum(c.prompt_tokens // CHUNK for c in done)


@dataclass
class Host:
    """One inference "host": a sidecar and the vLLM worker behind it."""

    name: str
    sidecar: SidecarProcess
    worker: VllmWorker

    def serve(self, prompts: Sequence[str]) -> list[Completion]:
        return [self.worker.complete(p, MAX_TOKENS) for p in prompts]

    def counters(self) -> dict[str, float]:
        self.sidecar.admin.wait_events_settled()
        s = self.sidecar
        return {
            "external_hits": self.worker.metric(EXTERNAL_HITS),
            "l2_hit_keys": s.metric(L2_HIT_KEYS),
            "l2_hit_tokens": s.metric(L2_HIT_TOKENS),
            "l1_hit_keys": s.metric(L1_HIT_KEYS),
            "memkv_loaded_keys": s.metric("memkv_l2_keys", op="load", outcome="hit"),
            "memkv_loaded_bytes": s.metric("memkv_l2_bytes", direction="load"),
            "memkv_stored_keys": s.metric("memkv_l2_keys", op="store", outcome="stored"),
        }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


class Rig:
    """Everything the tests share; ``close()`` stops every process, also after a failure."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.nodes: list[NodeProcess] = []
        self.sidecars: list[SidecarProcess] = []
        self.workers: list[VllmWorker] = []
        self.model: TinyModel | None = None
        self.baseline: dict[str, str] = {}
        self.baseline_times: list[float] = []
        self.hosts: dict[str, Host] = {}

    def start(self) -> None:
        self.model = make_tiny_llama(self.tmp / "model")
        first = self._node()
        assert first.control
        for _ in range(2):
            self._node("--seed", first.control)
        # The reference worker starts alongside the two hosts' workers: start-up is most of the time.
        a_side, b_side = self.sidecar(), self.sidecar()
        pool = ThreadPoolExecutor(3)
        try:
            futures = [pool.submit(self.worker, s) for s in (None, a_side, b_side)]
            plain, a_worker, b_worker = (f.result() for f in futures)
        except BaseException:
            # Killing the workers ends the other threads' start-up waits at once.
            for worker in self.workers:
                worker.stop(timeout_s=5.0)
            raise
        finally:
            pool.shutdown(wait=True)
        self.hosts = {"A": Host("A", a_side, a_worker), "B": Host("B", b_side, b_worker)}
        for sidecar in (a_side, b_side):
            wait_until(
                "the adapter sees three ALIVE nodes",
                lambda s=sidecar: s.metric("memkv_l2_members", state="ALIVE") == 3,
                60,
            )
        done = [plain.complete(p, MAX_TOKENS) for p in [*REUSE, *FAULT]]
        self.baseline = {c.prompt: c.text for c in done}
        self.baseline_times = [c.seconds for c in done]
        plain.stop()  # two cores: the reference worker's job is done

    def _node(self, *args: str) -> NodeProcess:
        node = NodeProcess.start(capacity="256MiB", args=[*NODE_ARGS, *args], log_dir=self.tmp / "logs")
        self.nodes.append(node)
        return node

    def sidecar(self) -> SidecarProcess:
        assert self.nodes[0].control
        adapter: dict[str, Any] = {"type": "memkv", "servers": self.nodes[0].control, "replicas": 2, "timeout_s": 1.0}
        # auto: vLLM's CPU worker registers its KV cache engine-driven, LMCache's default serves only lmcache-driven.
        cfg = SidecarConfig(l2_adapters=[adapter], l1_size_gb=L1_GB, chunk_size=CHUNK, supported_transfer_mode="auto")
        sidecar = SidecarProcess(cfg, log_dir=self.tmp / "logs", ready_timeout_s=180)
        self.sidecars.append(sidecar)
        return sidecar.start()

    def worker(self, sidecar: SidecarProcess | None) -> VllmWorker:
        assert self.model is not None
        cfg = WorkerConfig(self.model, sidecar_url=sidecar.rpc_url if sidecar else None, heartbeat_s=HEARTBEAT_S)
        worker = VllmWorker(cfg, log_dir=self.tmp / "logs", ready_timeout_s=900)
        self.workers.append(worker)
        return worker.start()

    def close(self) -> None:
        for worker in reversed(self.workers):
            worker.stop()
        for sidecar in reversed(self.sidecars):
            sidecar.stop()
        for node in reversed(self.nodes):
            node.stop()
        with contextlib.suppress(Exception):
            print(f"logs: {self.tmp / 'logs'}")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("vllm"))
    try:
        rig.start()
        yield rig
    finally:
        rig.close()


def report(label: str, done: Sequence[Completion] | Sequence[float]) -> None:
    seconds = [c if isinstance(c, float) else c.seconds for c in done]
    times = ", ".join(f"{t * 1000:.0f}" for t in seconds)
    print(f"\n{label}: request ms [{times}]")


def test_memkv_demo_vllm_shows_b_reusing_what_a_computed(tmp_path: Path) -> None:
    """First in the module: the demo starts its own processes, before the rig's exist (two cores)."""
    cmd = [*memkv_command(), "demo", "--vllm", "--json", "--prompts", "2", "--tokens", str(PROMPT_WORDS)]
    cmd += ["--layers", "2", "--hidden", "128", "--log-dir", str(tmp_path), "--timeout", "1200"]
    proc = subprocess.Popen(cmd, env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=1500)
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: the demo stops the nodes, sidecars and workers it started
            try:
                proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    doc = json.loads(stdout)
    plain, a, b = doc["workers"]
    assert doc["ok"] and plain["name"] == "no cache" and (a["name"], b["name"]) == ("A", "B")
    assert plain["tokens_from_memkv"] == a["tokens_from_memkv"] == 0
    assert b["tokens_from_memkv"] > 0 and b["tokens_computed"] < a["tokens_computed"]
    assert a["outputs_match_no_cache"] and b["outputs_match_no_cache"]
    assert doc["sidecar_b_l2_hit_chunks"] > 0 and doc["adapter_b_loaded_bytes"] > 0
    assert len(b["request_ms"]) == 2


def test_b_gets_the_kv_a_computed_from_memkv_and_outputs_match_a_no_cache_run(rig: Rig) -> None:
    a, b = rig.hosts["A"], rig.hosts["B"]
    a0, b0 = a.counters(), b.counters()
    from_a = a.serve(REUSE)
    a.sidecar.wait_store_drained(60)
    da = delta(a.counters(), a0)
    assert da["external_hits"] == 0 and da["l2_hit_keys"] == 0  # A computed everything
    assert da["memkv_stored_keys"] >= chunks(from_a)  # and wrote it through to MemKV
    assert sum(n.client().stats()["keys"] for n in rig.nodes) >= 2 * chunks(from_a)  # two replicas

    from_b = b.serve(REUSE)
    db = delta(b.counters(), b0)
    # B's sidecar never saw these prompts: every cacheable token came from MemKV.
    assert db["l1_hit_keys"] == 0
    assert db["l2_hit_keys"] == chunks(from_a), db
    assert db["l2_hit_tokens"] == chunks(from_a) * CHUNK, db  # lmcache_mp_lookup_hit_l2_tokens_total
    assert db["memkv_loaded_keys"] >= chunks(from_a), db
    assert db["memkv_loaded_bytes"] > 0
    assert db["external_hits"] == cacheable(from_a), db  # vLLM on B counts them as external prefix hits

    assert [c.text for c in from_a] == [rig.baseline[p] for p in REUSE]
    assert [c.text for c in from_b] == [c.text for c in from_a]
    report("no cache", rig.baseline_times[: len(REUSE)])
    report("A computes (stores to MemKV)", from_a)
    report("B loads from MemKV", from_b)


def test_a_node_killed_while_b_serves_requests_complete_with_identical_outputs(rig: Rig) -> None:
    a, b = rig.hosts["A"], rig.hosts["B"]
    from_a = a.serve(FAULT)
    a.sidecar.wait_store_drained(60)
    b0 = b.counters()
    # Never the seed node: the restart test's fresh sidecar joins through it.
    victim = max(rig.nodes[1:], key=lambda n: n.client().stats()["keys"])
    from_b = [b.worker.complete(FAULT[0], MAX_TOKENS)]
    victim.kill()
    from_b += b.serve(FAULT[1:])
    db = delta(b.counters(), b0)
    assert b.sidecar.alive() and b.worker.alive()
    assert db["external_hits"] > 0  # the surviving replicas still served
    assert [c.text for c in from_b] == [c.text for c in from_a] == [rig.baseline[p] for p in FAULT]
    report("B with a node killed", from_b)


def test_a_restarted_sidecar_with_an_empty_l1_gets_its_hits_back_from_memkv(rig: Rig) -> None:
    b = rig.hosts["B"]
    old = b.sidecar
    # Same ports, so the running worker finds it again: its connector pings the sidecar, and on
    # the way back to healthy registers its KV cache with the new process. One MemKV node is
    # still dead from the previous test.
    cfg = replace(old.config, rpc_port=old.endpoints.rpc_port, http_port=old.endpoints.http_port)
    degraded, resumed = (b.worker.log_count(t) for t in (DEGRADED, RESUMED))
    old.stop()
    # Two connector halves ping the sidecar, each on its own: the scheduler's (lookups) and the
    # worker's (transfers). Requests before both are back are served without the cache.
    wait_until("the worker notices its sidecar is gone", lambda: b.worker.log_count(DEGRADED) >= degraded + 2, 120, 0.5)
    sidecar = SidecarProcess(cfg, log_dir=rig.tmp / "logs", ready_timeout_s=180)
    rig.sidecars.append(sidecar)
    sidecar.start()
    wait_until("the adapter sees the live nodes", lambda: sidecar.metric("memkv_l2_members", state="ALIVE") >= 2, 60)
    wait_until("the worker is back on its sidecar", lambda: b.worker.log_count(RESUMED) >= resumed + 2, 120, 0.5)
    b.sidecar = sidecar

    before = b.counters()
    done = b.serve(REUSE)
    d = delta(b.counters(), before)
    assert d["l1_hit_keys"] == 0  # a new process: nothing in L1 before these requests
    assert d["l2_hit_keys"] == chunks(done), d  # every chunk survived on a live replica
    assert d["l2_hit_tokens"] == chunks(done) * CHUNK, d
    assert d["memkv_loaded_keys"] >= chunks(done), d
    assert d["external_hits"] == cacheable(done), d
    assert [c.text for c in done] == [rig.baseline[p] for p in REUSE]
    report("B after its sidecar restarted, loads from MemKV", done)
