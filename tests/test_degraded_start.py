"""A sidecar started before its MemKV cluster: it serves (misses, failed stores), says so once in
its log, and starts using the cluster when a node appears on the configured endpoint. Also the
fail-fast setting that restores the old refusal, and data-port ``servers`` (MinIO's spelling).

Geometry: one 256-token chunk is 512 KiB; a 1024-token request is 4 chunks.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from conftest import SidecarFactory
from nodeproc import NodeFactory

from lmcache_memkv.sidecar.process import SidecarConfig, SidecarProcess, SidecarStartError, free_loopback_port
from lmcache_memkv.sidecar.workload import Workload, WorkloadConfig

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*LoggingHandler.*:DeprecationWarning")]

MIB_GB = 1 / 1024  # --l1-size-gb takes GiB


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.2)


def _memkv_status(sidecar: SidecarProcess) -> dict:
    return next(a for a in sidecar.status()["storage_manager"]["l2_adapters"] if a.get("type") == "memkv")


def test_sidecar_starts_before_any_node_then_uses_the_node_that_appears(
    node_factory: NodeFactory, sidecar_factory: SidecarFactory
) -> None:
    data, control = free_loopback_port(), free_loopback_port()
    adapter = {"type": "memkv", "servers": f"127.0.0.1:{control}", "timeout_s": 1.0}
    cfg = SidecarConfig(l2_adapters=[adapter], l1_size_gb=64 * MIB_GB)
    sidecar = sidecar_factory(cfg, require_healthy=False)  # nothing listens on `control` yet

    log = sidecar.log_path.read_text()
    assert "starting DEGRADED" in log and f"127.0.0.1:{control}" in log  # one clear warning, naming the server
    assert log.count("starting DEGRADED") == 1
    assert "memkv adapter up (degraded" in log  # memkv.* lines reach lmcache server's log
    status = _memkv_status(sidecar)
    assert status["degraded"] and not status["is_healthy"] and status["members_up"] == 0
    assert sidecar.metric("memkv_l2_cluster_connected") == 0

    with Workload(sidecar, WorkloadConfig(seed=71)) as wl:
        stored = wl.store(2, 1024)  # L1 takes them; the write-behind to MemKV fails (nothing to reach)
        assert stored.ok, stored
        sidecar.wait_store_drained(30)
        assert sidecar.metric("memkv_l2_ops", op="store", outcome="unavailable") >= 1
        assert sidecar.metric("memkv_l2_ops", op="store", outcome="partial") == 0
        assert sidecar.metric("memkv_l2_keys", op="store", outcome="stored") == 0
        unknown = wl.requests(2, 1024, start_index=100)
        looked = wl.lookup(unknown)  # answered, as misses
        assert (looked.chunks_hit, looked.misses) == (0, 8)
        missed = wl.retrieve(unknown)
        assert (missed.chunks_verified, missed.misses, missed.mismatches) == (0, 8, 0)

        # The node appears on exactly the configured control endpoint.
        node = node_factory(
            capacity="128MiB", args=["--listen", f"127.0.0.1:{data}", "--control-listen", f"127.0.0.1:{control}"]
        )
        _wait(lambda: sidecar.metric("memkv_l2_cluster_connected") == 1, 30, "the adapter connected in the background")
        _wait(lambda: _memkv_status(sidecar)["members_up"] == 1, 15, "the adapter sees the node ALIVE")
        assert not _memkv_status(sidecar)["degraded"]

        before = sidecar.metric("memkv_l2_keys", op="store", outcome="stored")
        stored = wl.store(4, 1024, start_index=10)
        assert stored.ok, stored
        sidecar.wait_store_drained(30)
        _wait(lambda: node.client().stats()["keys"] >= 16, 15, "16 chunks on the node")
        assert sidecar.metric("memkv_l2_keys", op="store", outcome="stored") - before >= 16
        assert sidecar.metric("memkv_l2_ops", op="store", outcome="ok") >= 1
    assert "leaving degraded mode" in sidecar.log_path.read_text()


def test_fail_fast_restores_the_refusal_to_start(tmp_path: Path) -> None:
    control = free_loopback_port()
    adapter = {"type": "memkv", "servers": f"127.0.0.1:{control}", "timeout_s": 1.0, "fail_fast": True}
    sidecar = SidecarProcess(SidecarConfig(l2_adapters=[adapter], l1_size_gb=16 * MIB_GB), log_dir=tmp_path)
    try:
        with pytest.raises(SidecarStartError, match="exited with"):
            sidecar.start()
        assert "cannot reach the MemKV cluster" in sidecar.log_path.read_text()
    finally:
        sidecar.stop()


def _free_pair() -> int:
    """A port P with P and P + 1 free a moment ago (a node's data port and default control port)."""
    for _ in range(50):
        port = free_loopback_port()
        if port < 65535:
            with socket.socket() as a, socket.socket() as b:
                try:
                    a.bind(("127.0.0.1", port))
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


def test_servers_may_name_a_data_port_as_minio_does(node_factory: NodeFactory, sidecar_factory: SidecarFactory) -> None:
    port = _free_pair()
    node = node_factory(capacity="128MiB", args=["--listen", f"127.0.0.1:{port}"])  # control: port + 1
    assert node.control == f"127.0.0.1:{port + 1}"
    adapter = {"type": "memkv", "servers": node.data}  # the data endpoint, MinIO's MEMKV_SERVERS spelling
    sidecar = sidecar_factory(SidecarConfig(l2_adapters=[adapter], l1_size_gb=64 * MIB_GB))
    status = _memkv_status(sidecar)
    assert status["members_up"] == 1 and not status["degraded"]
    assert f"memkv adapter up: servers={node.data}" in sidecar.log_path.read_text()
    with Workload(sidecar, WorkloadConfig(seed=81)) as wl:
        assert wl.store(2, 1024).ok
        sidecar.wait_store_drained(30)
    _wait(lambda: node.client().stats()["keys"] >= 8, 15, "8 chunks on the node")
