"""The adapter's own bookkeeping (task tables, event fds, lock counts, close), with a recording
stand-in for the cluster so each case is exact. The real cluster is in test_adapter_e2e.py."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from lmcache.v1.distributed.api import ObjectKey

from lmcache_memkv.adapter.memkv_l2_adapter import MemKVL2Adapter, MemKVL2AdapterConfig
from lmcache_memkv.errors import MemKVTimeout


class RecordingCluster:
    """Holds values in a dict and records every call; ``fail`` makes calls raise."""

    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.calls: list[tuple[str, int]] = []
        self.released: list[bytes] = []
        self.fail: Exception | None = None
        self.epoch = 1
        self.lock = threading.Lock()

    def _record(self, op: str, n: int) -> None:
        with self.lock:
            self.calls.append((op, n))
        if self.fail is not None:
            raise self.fail

    def put(self, keys: Sequence[bytes], values: Sequence[Any]) -> list[bool]:
        self._record("put", len(keys))
        for k, v in zip(keys, values):
            self.values[k] = bytes(v)
        return [True] * len(keys)

    def exists(self, keys: Sequence[bytes], lease_ttl_s: float = 0.0) -> list[int | None]:
        self._record("exists", len(keys))
        return [len(self.values[k]) if k in self.values else None for k in keys]

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[int | None]:
        self._record("get", len(keys))
        out: list[int | None] = []
        for k, b in zip(keys, buffers):
            v = self.values.get(k)
            if v is None or len(v) > len(b):
                out.append(None)
            else:
                memoryview(b)[: len(v)] = v
                out.append(len(v))
        return out

    def release(self, keys: Sequence[bytes]) -> None:
        self._record("release", len(keys))
        self.released += keys

    def delete(self, keys: Sequence[bytes]) -> list[bool]:
        self._record("delete", len(keys))
        return [self.values.pop(k, None) is not None for k in keys]

    def members(self) -> list[Any]:
        return []

    def node_stats(self) -> dict[str, dict[str, Any]]:
        return {}

    def health(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


@pytest.fixture
def cluster() -> RecordingCluster:
    return RecordingCluster()


@pytest.fixture
def adapter(cluster: RecordingCluster) -> Iterator[MemKVL2Adapter]:
    a = MemKVL2Adapter(MemKVL2AdapterConfig.from_dict({"servers": "127.0.0.1:1", "timeout_s": 1.0}), cluster=cluster)  # type: ignore[arg-type]
    try:
        yield a
    finally:
        a.close()


def key(i: int) -> ObjectKey:
    return ObjectKey(chunk_hash=i.to_bytes(4, "big"), model_name="m", kv_rank=0)


def obj() -> Any:
    import torch
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    t = torch.zeros(64, dtype=torch.uint8)
    return TensorMemoryObj(t, MemoryObjMetadata(shape=t.shape, dtype=torch.uint8, address=0, phy_size=64, ref_count=1, pin_count=0, fmt=MemoryFormat.KV_2LTD), None)


def wait(fd: int, timeout_s: float = 5.0) -> None:
    ready, _, _ = select.select([fd], [], [], timeout_s)
    assert ready, "no completion signalled"
    os.read(fd, 8)


def lookup(adapter: MemKVL2Adapter, keys: list[ObjectKey]) -> list[bool]:
    tid = adapter.submit_lookup_and_lock_task(keys, {})
    while (bitmap := adapter.query_lookup_and_lock_result(tid)) is None:
        wait(adapter.get_lookup_and_lock_event_fd())
    return [bitmap.test(i) for i in range(len(keys))]


def test_event_fds_are_distinct(adapter: MemKVL2Adapter) -> None:
    fds = {adapter.get_store_event_fd(), adapter.get_lookup_and_lock_event_fd(), adapter.get_load_event_fd()}
    assert len(fds) == 3


def test_unlocks_reach_the_cluster_client_off_lmcache_s_thread(adapter: MemKVL2Adapter, cluster: RecordingCluster) -> None:
    # Which of these hold a lease (and where) is the cluster client's book (tested with it).
    cluster.values[adapter._wire([key(1)])[0]] = b"x"
    assert lookup(adapter, [key(1)]) == [True]
    adapter.submit_unlock([key(1), key(1)])
    adapter.submit_unlock([])
    adapter._misc_pool.submit(lambda: None).result(5)  # unlocks run in order on that pool
    assert cluster.released == adapter._wire([key(1), key(1)])


def test_a_lookup_that_cannot_even_be_encoded_is_still_answered(adapter: MemKVL2Adapter) -> None:
    bad = ObjectKey(chunk_hash=b"\x01", model_name="m", kv_rank=0)
    object.__setattr__(bad, "kv_rank", "not an int")  # breaks the wire-key encoder
    assert lookup(adapter, [bad]) == [False]
    assert adapter.report_status()["tasks_in_flight"] == 0


def test_failures_become_misses_and_a_failed_store(adapter: MemKVL2Adapter, cluster: RecordingCluster) -> None:
    cluster.fail = MemKVTimeout("node did not answer")
    assert lookup(adapter, [key(1), key(2)]) == [False, False]
    tid = adapter.submit_store_task([key(3)], [obj()])
    wait(adapter.get_store_event_fd())
    result = adapter.pop_completed_store_tasks()[tid]
    assert not result.is_successful()


def test_after_close_tasks_are_answered_at_once_without_network(cluster: RecordingCluster) -> None:
    a = MemKVL2Adapter(MemKVL2AdapterConfig.from_dict({"servers": "127.0.0.1:1"}), cluster=cluster)  # type: ignore[arg-type]
    a.close()
    before = list(cluster.calls)
    tid = a.submit_lookup_and_lock_task([key(1)], {})
    bitmap = a.query_lookup_and_lock_result(tid)
    assert bitmap is not None and not bitmap.test(0)
    assert cluster.calls == before  # no network call after close


class GatedCluster(RecordingCluster):
    """Stores block until ``gate`` opens; ``peak`` is how many ran at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.running = self.peak = 0

    def put(self, keys: Sequence[bytes], values: Sequence[Any]) -> list[bool]:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            assert self.gate.wait(10)
            return super().put(keys, values)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("num_workers", [0, 3])
def test_stores_run_on_as_many_threads_as_the_workers_setting(num_workers: int) -> None:
    from lmcache_memkv.adapter.settings import default_workers

    cluster = GatedCluster()
    a = MemKVL2Adapter(MemKVL2AdapterConfig.from_dict({"servers": "127.0.0.1:1", "num_workers": num_workers}), cluster=cluster)  # type: ignore[arg-type]
    try:
        tids = [a.submit_store_task([key(i)], [obj()]) for i in range(8)]
        want = num_workers or default_workers()
        deadline = time.monotonic() + 5
        while cluster.running < want and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # a pool larger than ``want`` would start more by now
        assert cluster.running == want
        cluster.gate.set()
        done: dict[Any, Any] = {}
        while len(done) < len(tids):
            wait(a.get_store_event_fd())
            done.update(a.pop_completed_store_tasks())
        assert cluster.peak == want and all(done[t].is_successful() for t in tids)
    finally:
        cluster.gate.set()
        a.close()
