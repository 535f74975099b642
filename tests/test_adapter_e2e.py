"""The memkv adapter inside a real ``lmcache server``, driven by LMCache's own clients.

A real ``memkv node`` process, a real ``lmcache server`` with ``--l2-adapter {"type":"memkv"}``,
LMCache's CPU-mode MP client (the one behind ``lmcache bench server``) and ``lmcache bench l2``.
Geometry: one 256-token chunk is 512 KiB; a 1024-token request is 4 chunks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cluster_util import wait_until
from conftest import SidecarFactory
from nodeproc import NodeFactory, NodeProcess

from lmcache_memkv.sidecar.process import SidecarConfig
from lmcache_memkv.sidecar.workload import Workload, WorkloadConfig

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*LoggingHandler.*:DeprecationWarning")]

MIB_GB = 1 / 1024  # --l1-size-gb takes GiB
CHUNK = 512 * 1024
L2_HIT_KEYS = "lmcache_mp_lookup_hit_l2_keys"
L1_HIT_KEYS = "lmcache_mp_lookup_hit_l1_keys"
L2_STORED_CHUNKS = "lmcache_mp_l2_store_completed_objects_chunks"


def memkv_adapter(node: NodeProcess, **extra: Any) -> dict[str, Any]:
    assert node.control, "node reported no control endpoint"
    return {"type": "memkv", "servers": node.control, **extra}


def small_l1(adapter: dict[str, Any]) -> SidecarConfig:
    # 16 chunks of L1, evicting half at half full: 32-chunk workloads must leave L1 (DESIGN.md section 8).
    return SidecarConfig(l2_adapters=[adapter], l1_size_gb=8 * MIB_GB, eviction_trigger_watermark=0.5, eviction_ratio=0.5)


def test_chunks_leave_l1_for_memkv_and_come_back_byte_exact(node_factory: NodeFactory, sidecar_factory: SidecarFactory) -> None:
    node = node_factory(capacity="256MiB")
    sidecar = sidecar_factory(small_l1(memkv_adapter(node)))
    before = {
        "stored": sidecar.metric("memkv_l2_keys", op="store", outcome="stored"),
        "loaded": sidecar.metric("memkv_l2_bytes", direction="load"),
        "lookups": sidecar.metric("memkv_l2_ops", op="lookup"),
    }
    with Workload(sidecar, WorkloadConfig(seed=41, l1_headroom=0.75)) as wl:
        stored = wl.store(8, 1024)
        assert stored.ok, stored
        sidecar.admin.wait_events_settled()
        assert sidecar.metric(L2_STORED_CHUNKS) == 32
        assert node.client().stats()["keys"] == 32  # every chunk really is on the node
        assert sidecar.admin.l1_object_count() < 32  # the early requests have left L1

        l2_hits = sidecar.metric(L2_HIT_KEYS)
        got = wl.retrieve(stored.requests)
        assert got.ok, got
        assert (got.chunks_verified, got.mismatches, got.misses) == (32, 0, 0)
        sidecar.admin.wait_events_settled()
        from_l2 = sidecar.metric(L2_HIT_KEYS) - l2_hits
        assert from_l2 >= 16  # at least what L1 could not hold came from MemKV

    # Our own series on the sidecar's admin /metrics moved with the traffic.
    assert sidecar.metric("memkv_l2_keys", op="store", outcome="stored") - before["stored"] == 32
    assert sidecar.metric("memkv_l2_bytes", direction="load") - before["loaded"] >= from_l2 * CHUNK
    assert sidecar.metric("memkv_l2_ops", op="lookup") > before["lookups"]
    assert sidecar.metric("memkv_l2_op_seconds_count", op="load") > 0
    assert sidecar.metric("memkv_l2_members", state="ALIVE") == 1
    # The node counts a GET once its answer is out: the last one may land just after the sidecar has it.
    wait_until("node sent-bytes counted", lambda: node.metric("memkv_node_sent_bytes_total") >= from_l2 * CHUNK, 5.0)

    # `lmcache describe kvcache` shows the adapter: transport, servers, view epoch, members up/down, health.
    status = next(a for a in sidecar.status()["storage_manager"]["l2_adapters"] if a.get("type") == "memkv")
    assert status["is_healthy"] and status["members_up"] == 1 and status["transport"] == "tcp"
    lmcache = str(Path(sys.executable).with_name("lmcache"))
    env = dict(os.environ, LMCACHE_TRACK_USAGE="false", LMCACHE_DISABLE_BANNER="1")
    described = subprocess.run(
        [lmcache, "describe", "kvcache", "--url", sidecar.admin_url], env=env, capture_output=True, text=True, timeout=120
    )
    assert described.returncode == 0, described.stderr
    assert "L2: memkv" in described.stdout
    assert f"servers {node.control}" in described.stdout and "members 1 up / 0 down" in described.stdout


def test_fresh_sidecar_reads_back_everything_stored_before(node_factory: NodeFactory, sidecar_factory: SidecarFactory) -> None:
    node = node_factory(capacity="256MiB")
    cfg = SidecarConfig(l2_adapters=[memkv_adapter(node)], l1_size_gb=64 * MIB_GB)
    first = sidecar_factory(cfg)
    with Workload(first, WorkloadConfig(seed=51)) as wl:
        stored = wl.store(4, 1024)
        assert stored.ok, stored
        first.wait_store_drained(30)
        first.admin.wait_events_settled()
        assert first.metric(L2_STORED_CHUNKS) == 16
    first.stop()

    second = sidecar_factory(cfg)  # empty L1; same node
    with Workload(second, WorkloadConfig(seed=51)) as wl:  # a new client: identity comes from the seed
        got = wl.retrieve(wl.requests(4, 1024))
        assert got.ok, got
        assert (got.chunks_verified, got.mismatches) == (16, 0)
    second.admin.wait_events_settled()
    assert second.metric(L2_HIT_KEYS) == 16
    assert second.metric(L1_HIT_KEYS) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dead_node_means_misses_within_the_timeout_and_a_restarted_node_is_used_again(
    node_factory: NodeFactory, sidecar_factory: SidecarFactory
) -> None:
    timeout_s = 1.0
    slack_s = 4.0  # LMCache's own prefetch polling and RPC hops on a loaded two-core machine
    data, control = _free_port(), _free_port()
    fixed = ["--listen", f"127.0.0.1:{data}", "--control-listen", f"127.0.0.1:{control}"]
    node = node_factory(capacity="256MiB", args=fixed)
    sidecar = sidecar_factory(small_l1(memkv_adapter(node, timeout_s=timeout_s)))
    with Workload(sidecar, WorkloadConfig(seed=61, l1_headroom=0.75)) as wl:
        stored = wl.store(8, 1024)
        assert stored.ok, stored
        sidecar.admin.wait_events_settled()
        assert sidecar.metric(L2_STORED_CHUNKS) == 32

        # Load-heavy phase: read the requests back one by one; the node dies after the second.
        epoch_before = sidecar.metric("memkv_l2_view_epoch")
        verified = misses = 0
        for i, spec in enumerate(stored.requests):
            if i == 2:
                node.kill()
            started = time.monotonic()
            got = wl.retrieve([spec])
            waited = time.monotonic() - started
            assert waited < timeout_s + slack_s, f"request {i} waited {waited:.1f}s"
            assert got.mismatches == 0  # a miss, never wrong bytes
            verified += got.chunks_verified
            misses += got.misses + got.retrieve_failures
        assert sidecar.alive()
        assert verified >= 8  # before the kill
        assert misses > 0  # chunks only the dead node held are misses now
        assert sidecar.status()  # the admin port still answers

        # Same endpoints, empty arena, higher incarnation: once the adapter's view has the new
        # life (the epoch moves), it is used again.
        reborn = node_factory(capacity="256MiB", args=fixed)
        deadline = time.monotonic() + 30
        while sidecar.metric("memkv_l2_view_epoch") <= epoch_before and time.monotonic() < deadline:
            time.sleep(0.5)
        assert sidecar.metric("memkv_l2_view_epoch") > epoch_before, "the adapter never saw the restarted node"
        assert sidecar.metric("memkv_l2_members", state="ALIVE") == 1
        fresh = wl.store(8, 1024, start_index=100)
        assert fresh.ok, fresh
        sidecar.admin.wait_events_settled()
        got = wl.retrieve(fresh.requests)
        assert got.ok, got
        assert reborn.client().stats()["keys"] == 32


def test_lmcache_bench_l2_verifies_every_key_and_lookups_hit(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory(capacity="512MiB")
    out = tmp_path / "bench.json"
    lmcache = str(Path(sys.executable).with_name("lmcache"))
    cmd = [
        lmcache, "bench", "l2", "--l2-adapter", json.dumps(memkv_adapter(node)),
        "--data-size-kb", "1024", "--num-keys", "32", "--in-flight", "2", "--rounds", "3",
        "--no-skip-verify", "--lookup-max-hit-rate", "1.0", "--format", "json", "--output", str(out),
    ]
    env = dict(os.environ, LMCACHE_TRACK_USAGE="false", LMCACHE_DISABLE_BANNER="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "All 64 keys data verified OK" in text, text[-3000:]
    ops = {m["operation"]: m for k, m in json.loads(out.read_text())["metrics"].items() if k.startswith("op_")}
    assert set(ops) == {"Store", "Lookup", "Load"}
    for op in ops.values():
        assert op["total_success"] == op["total_keys"] == 192, op
        assert op["rounds_timed_out"] == 0
    assert ops["Lookup"]["actual_hit_rate"] == 1.0


def test_with_two_replicas_a_dead_memory_host_loses_nothing(node_factory: NodeFactory, sidecar_factory: SidecarFactory) -> None:
    first = node_factory(capacity="128MiB")
    assert first.control
    others = [node_factory(capacity="128MiB", args=["--seed", first.control]) for _ in range(2)]
    nodes = [first, *others]
    sidecar = sidecar_factory(small_l1(memkv_adapter(first, replicas=2, timeout_s=1.0)))
    deadline = time.monotonic() + 30
    while sidecar.metric("memkv_l2_members", state="ALIVE") < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sidecar.metric("memkv_l2_members", state="ALIVE") == 3
    with Workload(sidecar, WorkloadConfig(seed=71, l1_headroom=0.75)) as wl:
        stored = wl.store(8, 1024)
        assert stored.ok, stored
        sidecar.admin.wait_events_settled()
        assert sum(n.client().stats()["keys"] for n in nodes) == 64  # 32 chunks, two copies each
        victim = max(nodes[1:], key=lambda n: n.client().stats()["keys"])
        victim.kill()
        got = wl.retrieve(stored.requests)
        assert got.ok, got  # every chunk still came back, byte for byte
        assert (got.chunks_verified, got.mismatches, got.misses) == (32, 0, 0)
    assert sidecar.alive()
