"""The sidecar harness against a real ``lmcache server`` with built-in L2 adapters (mock, fs).

Geometry: one 256-token chunk is 512 KiB (``KVGeometry()``), a 1024-token request is 4 chunks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import SidecarFactory

from lmcache_memkv.sidecar.process import (
    LOOPBACK,
    SidecarConfig,
    SidecarEndpoints,
    SidecarStartError,
    parse_metric_value,
)
from lmcache_memkv.sidecar.workload import (
    KVGeometry,
    LatencyStats,
    ProgressEvent,
    RequestSpec,
    Workload,
    WorkloadConfig,
    make_requests,
)

# LMCache's client side registers an OpenTelemetry logging handler that warns about itself.
pytestmark = pytest.mark.filterwarnings("ignore:.*LoggingHandler.*:DeprecationWarning")

MIB_GB = 1 / 1024  # --l1-size-gb takes GiB
L2_HIT_KEYS = "lmcache_mp_lookup_hit_l2_keys"
L1_HIT_KEYS = "lmcache_mp_lookup_hit_l1_keys"
L2_STORED_CHUNKS = "lmcache_mp_l2_store_completed_objects_chunks"
L1_EVICTED_CHUNKS = "lmcache_mp_l1_evicted_chunks"

# ---------------------------------------------------------------------------- no server needed


def test_server_args_bind_loopback_and_carry_settings() -> None:
    cfg = SidecarConfig(
        l2_adapters=[{"type": "fs", "base_path": "/tmp/x"}, {"type": "mock", "max_size_gb": 1, "mock_bandwidth_gb": 5}],
        l1_size_gb=0.125,
        chunk_size=128,
        eviction_trigger_watermark=0.5,
        eviction_ratio=0.25,
        supported_transfer_mode="auto",
        extra_args=["--max-workers", "2"],
    )
    args = cfg.server_args(SidecarEndpoints(LOOPBACK, 1111, 2222))
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert args[0] == "server"
    assert pairs["--host"] == pairs["--http-host"] == "127.0.0.1"
    assert (pairs["--port"], pairs["--http-port"], pairs["--chunk-size"]) == ("1111", "2222", "128")
    assert (pairs["--l1-size-gb"], pairs["--eviction-policy"]) == ("0.125", "LRU")
    assert (pairs["--eviction-trigger-watermark"], pairs["--eviction-ratio"]) == ("0.5", "0.25")
    assert pairs["--supported-transfer-mode"] == "auto"
    adapters = [json.loads(args[i + 1]) for i, a in enumerate(args) if a == "--l2-adapter"]
    assert [a["type"] for a in adapters] == ["fs", "mock"]
    assert args[-2:] == ["--max-workers", "2"]


@pytest.mark.parametrize(
    "kw", [{"l1_size_gb": 0}, {"eviction_ratio": 1.5}, {"eviction_trigger_watermark": 0.0}, {"l2_adapters": [{}]}]
)
def test_config_rejects_bad_values(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SidecarConfig(**kw)


def test_parse_metric_value_matches_name_and_labels() -> None:
    text = "\n".join(
        [
            "# HELP lmcache_mp_lookup_hit_l2_keys_total Hit keys loaded from L2 into L1.",
            "# TYPE lmcache_mp_lookup_hit_l2_keys_total counter",
            'lmcache_mp_lookup_hit_l2_keys_total{cache_salt="",model_name="a"} 3.0',
            'lmcache_mp_lookup_hit_l2_keys_total{cache_salt="",model_name="b"} 4.0',
            "# TYPE lmcache_mp_l1_usage_ratio gauge",
            'lmcache_mp_l1_usage_ratio{backend="dram"} 0.5',
            "",
        ]
    )
    assert parse_metric_value(text, "lmcache_mp_lookup_hit_l2_keys") == 7.0
    assert parse_metric_value(text, "lmcache_mp_lookup_hit_l2_keys_total", {"model_name": "b"}) == 4.0
    assert parse_metric_value(text, "lmcache_mp_l1_usage_ratio", {"backend": "dram"}) == 0.5
    assert parse_metric_value(text, "lmcache_mp_absent") == 0.0


def test_requests_are_reproducible_and_distinct() -> None:
    a, b = make_requests(7, 2, 512), make_requests(7, 2, 512)
    assert a == b and a[0].token_ids() == b[0].token_ids()
    assert a[0].token_ids() != a[1].token_ids()
    assert make_requests(8, 1, 512)[0].token_ids() != a[0].token_ids()
    assert RequestSpec(7, 0, 512).chunk_seed(0) == a[0].chunk_seed(0) != a[0].chunk_seed(1)
    assert KVGeometry().chunk_bytes(256) == 512 * 1024
    assert LatencyStats.of([3.0, 1.0, 2.0]).p50_ms == 2.0


# ---------------------------------------------------------------------------- real lmcache server


@pytest.mark.slow
def test_store_then_retrieve_byte_exact_from_l1(sidecar_factory: SidecarFactory) -> None:
    mock = {"type": "mock", "max_size_gb": 0.25, "mock_bandwidth_gb": 10.0}
    sidecar = sidecar_factory(SidecarConfig(l2_adapters=[mock], l1_size_gb=64 * MIB_GB))
    events: list[ProgressEvent] = []
    with Workload(sidecar, WorkloadConfig(seed=11), progress=events.append) as wl:
        stored = wl.store(4, 1024)
        assert stored.ok, stored
        assert (stored.chunks_attempted, stored.chunks_stored, stored.chunks_dropped) == (16, 16, 0)
        assert stored.bytes_stored == 16 * wl.chunk_bytes
        assert [(e.op, e.done, e.total) for e in events] == [("store", i, 4) for i in range(1, 5)]

        l1_hits = sidecar.metric(L1_HIT_KEYS)
        got = wl.retrieve(stored.requests)
        assert got.ok, got
        assert (got.chunks_hit, got.chunks_retrieved, got.chunks_verified) == (16, 16, 16)
        assert (got.mismatches, got.misses, got.retrieve_failures) == (0, 0, 0)
        sidecar.admin.wait_events_settled()
        assert sidecar.metric(L1_HIT_KEYS) - l1_hits == 16
        assert sidecar.metric(L2_HIT_KEYS) == 0
        assert sidecar.metric(L2_STORED_CHUNKS) == 16  # write-behind reached the mock L2 (paced)

        looked = wl.lookup(stored.requests)
        assert looked.hits_per_request == (4, 4, 4, 4)
        l1 = sidecar.status()["storage_manager"]["l1_manager"]
        assert l1["read_locked_count"] == 0  # lookup handed its read locks back (L1 stays evictable)

        unknown = wl.requests(2, 1024, start_index=100)
        looked = wl.lookup(unknown)
        assert (looked.chunks_hit, looked.misses, looked.hits_per_request) == (0, 8, (0, 0))
        missed = wl.retrieve(unknown)
        assert (missed.chunks_verified, missed.misses, missed.mismatches) == (0, 8, 0)
        assert not missed.ok
    assert sidecar.store_backlog().idle


@pytest.mark.slow
def test_small_l1_spills_to_l2_and_evicted_requests_come_back_exact(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    # L1 holds 16 chunks; 8 requests x 4 chunks is twice that. Evict at half full, half the keys
    # each tick; the workload waits for L1 < 75% before each op so a 4-chunk store or prefetch fits.
    cfg = SidecarConfig(
        l2_adapters=[{"type": "fs", "base_path": str(tmp_path / "l2")}],
        l1_size_gb=8 * MIB_GB,
        eviction_trigger_watermark=0.5,
        eviction_ratio=0.5,
    )
    sidecar = sidecar_factory(cfg)
    with Workload(sidecar, WorkloadConfig(seed=21, l1_headroom=0.75)) as wl:
        l1_capacity_chunks = sidecar.admin.l1_usage()[1] // wl.chunk_bytes
        assert l1_capacity_chunks == 16
        stored = wl.store(8, 1024)
        assert stored.ok, stored
        sidecar.admin.wait_events_settled()
        assert sidecar.metric(L2_STORED_CHUNKS) == 32
        assert sidecar.metric(L1_EVICTED_CHUNKS) > 0
        assert len(list((tmp_path / "l2").glob("*.data"))) == 32
        assert sidecar.admin.l1_object_count() < 32  # early requests are gone from L1

        l2_hits = sidecar.metric(L2_HIT_KEYS)
        got = wl.retrieve(stored.requests)
        assert got.ok, got
        assert (got.chunks_verified, got.mismatches, got.misses) == (32, 0, 0)
        sidecar.admin.wait_events_settled()
        # Whatever L1 still held, at least the 16 chunks beyond its capacity came from L2.
        assert sidecar.metric(L2_HIT_KEYS) - l2_hits >= 32 - l1_capacity_chunks


@pytest.mark.slow
def test_fresh_server_retrieves_everything_from_fs_l2(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    cfg = SidecarConfig(l2_adapters=[{"type": "fs", "base_path": str(tmp_path / "l2")}], l1_size_gb=64 * MIB_GB)
    first = sidecar_factory(cfg)
    with Workload(first, WorkloadConfig(seed=31)) as wl:
        stored = wl.store(4, 1024)
    assert stored.ok, stored
    assert first.stop() is not None and not first.alive()
    assert len(list((tmp_path / "l2").glob("*.data"))) == 16

    second = sidecar_factory(cfg)  # same fs directory, empty L1
    assert second.admin.l1_object_count() == 0
    with Workload(second, WorkloadConfig(seed=31)) as wl:  # a new client: identity comes from the seed
        got = wl.retrieve(wl.requests(4, 1024))
    assert got.ok, got
    assert (got.chunks_hit, got.chunks_verified, got.mismatches) == (16, 16, 0)
    second.admin.wait_events_settled()
    assert second.metric(L2_HIT_KEYS) == 16
    assert second.metric(L1_HIT_KEYS) == 0


@pytest.mark.parametrize(
    ("script", "expect"),
    [
        ("import sys; print('boom: bad adapter'); sys.exit(3)", "exited with 3"),
        ("import time; print('boom: stuck'); time.sleep(60)", "not ready within"),
    ],
)
def test_start_failure_reports_log_tail(sidecar_factory: SidecarFactory, script: str, expect: str) -> None:
    # A stand-in command keeps this fast; the harness appends the server arguments, which -c ignores.
    with pytest.raises(SidecarStartError) as err:
        sidecar_factory(SidecarConfig(), command=[sys.executable, "-c", script], ready_timeout_s=3)
    assert expect in str(err.value)
    assert "boom" in str(err.value)  # the log tail is part of the error
    assert "--http-host 127.0.0.1" in str(err.value)  # the command line heads the log
