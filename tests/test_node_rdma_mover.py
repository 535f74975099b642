"""The RDMA mover's ordering, with a fake queue pair (the one place a fault must be injected on a
host without verbs): a transfer that fails or times out fences the queue pair BEFORE the mover
returns, so the node core gives extents back (``abandon``/``release``) only once no late READ or
WRITE can touch them; a GET answers only after every WRITE completed. Real verbs: tests/rdma/guest."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from lmcache_memkv.errors import MemKVTimeout
from lmcache_memkv.node.config import NodeConfig
from lmcache_memkv.node.movers import RdmaMover
from lmcache_memkv.transport.rdma import READ, WRITE, RdmaError, Region
from lmcache_memkv.transport.tcp import Buffer

ARENA = bytearray(4096)
BASE = ctypes.addressof(ctypes.c_char.from_buffer(ARENA))
REGION = Region(addr=BASE, length=len(ARENA), lkey=7, rkey=0)


class FakeQP:
    def __init__(self, events: list[str], fail: BaseException | None = None, safe: bool = True) -> None:
        self.events = events
        self.fail = fail
        self.safe = safe
        self.posted: list[tuple[str, int, int, int, int, int]] = []

    def post_and_wait(self, ops: Sequence[tuple[str, int, int, int, int, int]], deadline: float) -> None:
        self.posted += ops
        self.events.append("post")
        if self.fail is not None:
            raise self.fail

    def fence(self) -> bool:
        self.events.append("fence")
        return self.safe


class FakeTcp:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def reply(self, frames: Sequence[Buffer], deadline: float) -> None:
        self.events.append("reply")


class FakePut:
    sizes = (16, 0, 32)

    def __init__(self, events: list[str], refuse: int = -1) -> None:
        self.events = events
        self.refuse = refuse

    def claim(self, i: int) -> memoryview | None:
        self.events.append(f"claim{i}")
        return None if i == self.refuse else memoryview(ARENA)[i * 100 : i * 100 + self.sizes[i]]

    def landed(self) -> None:
        self.events.append("landed")

    def quarantine(self) -> None:
        self.events.append("quarantine")

    def answer(self) -> bytes:
        return b"answer"


class FakeGet:
    found = [0, 2]
    head = b"head"

    def __init__(self, events: list[str] | None = None) -> None:
        self.events = events if events is not None else []

    def quarantine(self) -> None:
        self.events.append("quarantine")

    def views(self) -> list[memoryview]:
        return [memoryview(ARENA)[0:10], memoryview(ARENA)[200:230]]


def mover(qp: FakeQP, events: list[str], fences: list[int]) -> RdmaMover:
    return RdmaMover(qp, REGION, [1000, 2000, 3000], [5, 5, 5], FakeTcp(events), on_fence=lambda: fences.append(1))  # type: ignore[arg-type]


def test_put_reads_each_value_into_its_extent_then_answers() -> None:
    events: list[str] = []
    qp = FakeQP(events)
    mover(qp, events, []).put(FakePut(events, refuse=2), deadline=1e18)  # type: ignore[arg-type]
    # Value 1 is empty (nothing to read), value 2 refused (nothing to drain): one READ only.
    assert events == ["claim0", "post", "landed", "claim1", "landed", "claim2", "reply"]
    assert qp.posted == [(READ, BASE, 7, 16, 1000, 5)]


@pytest.mark.parametrize("fault", [MemKVTimeout("late"), RdmaError("WR failed")])
def test_failed_put_fences_before_the_extent_can_be_given_back(fault: BaseException) -> None:
    events: list[str] = []
    fences: list[int] = []
    with pytest.raises(type(fault)):
        mover(FakeQP(events, fault), events, fences).put(FakePut(events), deadline=1e18)  # type: ignore[arg-type]
    # Never "landed", never answered; the fence is the last thing before the core's abandon().
    assert events == ["claim0", "post", "fence"] and fences == [1]


def test_get_writes_every_found_value_then_answers() -> None:
    events: list[str] = []
    qp = FakeQP(events)
    mover(qp, events, []).get(FakeGet(), deadline=1e18)  # type: ignore[arg-type]
    assert events == ["post", "reply"]  # all WRITEs complete before the answer
    assert qp.posted == [(WRITE, BASE, 7, 10, 1000, 5), (WRITE, BASE + 200, 7, 30, 3000, 5)]


def test_timed_out_get_fences_and_never_answers() -> None:
    events: list[str] = []
    fences: list[int] = []
    with pytest.raises(MemKVTimeout):
        mover(FakeQP(events, MemKVTimeout("late")), events, fences).get(FakeGet(), deadline=1e18)  # type: ignore[arg-type]
    assert events == ["post", "fence"] and fences == [1]


@pytest.mark.parametrize("op", ["put", "get"])
def test_an_unconfirmed_fence_quarantines_the_extents(op: str) -> None:
    """The flushed completions never came back: a late READ/WRITE may still touch the extents,
    so the plan must not give them back (the core's abandon/release then finds nothing)."""
    events: list[str] = []
    m = mover(FakeQP(events, MemKVTimeout("late"), safe=False), events, [])
    with pytest.raises(MemKVTimeout):
        if op == "put":
            m.put(FakePut(events), deadline=1e18)  # type: ignore[arg-type]
        else:
            m.get(FakeGet(events), deadline=1e18)  # type: ignore[arg-type]
    assert events[-2:] == ["fence", "quarantine"]


def test_rdma_flags_are_checked() -> None:
    for kw, flag in (({"rdma_port": 0}, "--rdma-port"), ({"rdma_gid_index": 256}, "--rdma-gid-index"), ({"rdma_device": " "}, "--rdma-device")):
        with pytest.raises(ValueError, match=flag):
            NodeConfig(**kw)  # type: ignore[arg-type]


def test_max_rdma_sessions_is_checked_and_reaches_the_config() -> None:
    assert NodeConfig().max_rdma_sessions == 1024
    assert NodeConfig(max_rdma_sessions=7).max_rdma_sessions == 7
    with pytest.raises(ValueError, match="--max-rdma-sessions must be at least 1, got 0"):
        NodeConfig(max_rdma_sessions=0)


def test_max_rdma_sessions_from_the_environment_and_the_settings_file(tmp_path: Path) -> None:
    """Same machinery as every node flag: MEMKV_MAX_RDMA_SESSIONS, ``max-rdma-sessions:`` in the
    file; a bad value names the flag and where it came from (checked before anything starts)."""
    cmd = [sys.executable, "-m", "lmcache_memkv.cli.main", "node", "--listen", "127.0.0.1:0", "--capacity", "8MiB"]
    env = {**os.environ, "MEMKV_MAX_RDMA_SESSIONS": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "--max-rdma-sessions must be at least 1, got 0 (set by MEMKV_MAX_RDMA_SESSIONS)" in proc.stderr
    config = tmp_path / "node.yaml"
    config.write_text("max-rdma-sessions: -3\n")
    proc = subprocess.run([*cmd, "--config", str(config)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "--max-rdma-sessions must be at least 1, got -3" in proc.stderr, proc.stderr
    assert f"(set in {config} (max-rdma-sessions))" in proc.stderr


def test_a_named_rdma_device_that_cannot_open_stops_the_node() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lmcache_memkv.cli.main", "node", "--listen", "127.0.0.1:0", "--capacity", "8MiB",
         "--rdma-device", "nosuchdev0"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--rdma-device" in proc.stderr or "nosuchdev0" in proc.stderr, proc.stderr


def test_the_tcp_path_never_imports_pyverbs() -> None:
    """A node and a TCP client moving values (and the adapter's transport choice for tcp) leave
    pyverbs unloaded: hosts without verbs never pay for it, nor break on it."""
    code = """
import sys
from lmcache_memkv.node.config import NodeConfig
from lmcache_memkv.node.server import NodeServer
from lmcache_memkv.client.node_client import NodeClient
from lmcache_memkv.adapter.settings import resolve
from lmcache_memkv.adapter.memkv_l2_adapter import _choose_transport
from lmcache_memkv.adapter.metrics import get_metrics
s = NodeServer(NodeConfig(listen="127.0.0.1:0", capacity=8 << 20, node_id="n"))
s.start()
c = NodeClient(s.endpoint)
assert c.put([b"k"], [b"v" * 100]) == [0]
buf = bytearray(100)
assert c.get_into([b"k"], [buf]) == [100] and buf == b"v" * 100
assert _choose_transport(resolve({"servers": "h:1", "transport": "tcp"}, env={}), None, get_metrics())[0] == "tcp"
c.close(); s.stop(0)
assert not [m for m in sys.modules if m.startswith("pyverbs")], "pyverbs was imported"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
