"""A control plane that serves a thousand sidecars: watches cost no thread and no one is refused;
clients merge views record by record and back off with jitter when they re-watch."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cluster_util import InProcNode, member_list
from nodeproc import NodeFactory, node_env

from lmcache_memkv.cluster.backoff import Backoff
from lmcache_memkv.cluster.cluster_id import ClusterIdentity, WrongCluster
from lmcache_memkv.cluster.members import MemberTable
from lmcache_memkv.cluster.watch import ViewWatcher
from lmcache_memkv.control.channel import ChannelPool, open_channel
from lmcache_memkv.control.convert import member_to_proto, view_from_proto
from lmcache_memkv.control.member import Member, State
from lmcache_memkv.proto.memkv.v1 import (
    cluster_pb2,
    cluster_pb2_grpc,
    maintenance_pb2,
    maintenance_pb2_grpc,
    member_pb2,
)

KEY = bytes(range(40, 72))
WATCHERS = 1000
SWARMS = 2  # processes, each one event loop with WATCHERS // SWARMS streams
CHANNELS_PER_SWARM = 50  # connections of their own; streams share them as HTTP/2 allows
SWARM_DEADLINE_S = 90.0
# The node's threads may differ by a few between two readings (gRPC's and the data plane's
# housekeeping threads come and go); a thread per watcher would be hundreds.
THREAD_SLACK = 6
SWARM_SCRIPT = Path(__file__).with_name("watch_swarm.py")


class Swarm:
    """One ``watch_swarm.py`` process; its stdout lines arrive on a queue."""

    def __init__(self, endpoint: str, streams: int, expect: str) -> None:
        cmd = [
            sys.executable, str(SWARM_SCRIPT), endpoint, KEY.hex(), str(streams), str(CHANNELS_PER_SWARM), expect,
            str(SWARM_DEADLINE_S),
        ]  # fmt: skip
        env = node_env(
            {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
        )
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefix: str, timeout_s: float) -> str:
        """The next line starting with ``prefix`` ("error" lines are collected on the way)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {prefix!r} line within {timeout_s:.0f}s; errors so far: {self.errors}"
                ) from None
            if line.startswith("error"):
                self.errors.append(line)
            elif line.startswith(prefix):
                return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def test_a_thousand_watchers_see_a_join_and_cost_no_threads(node_factory: NodeFactory) -> None:
    env = {"MEMKV_AUTH_KEY": KEY.hex()}
    a = node_factory(capacity="16MiB", metrics=False, env=env, args=["--node-id", "a"])
    assert a.control is not None
    member_list(a.control, KEY)  # the control server has answered once: its threads are up
    time.sleep(0.5)
    threads_before, rss_before = a.thread_count(), rss_kib(a.pid)
    swarms = [Swarm(a.control, WATCHERS // SWARMS, expect="b") for _ in range(SWARMS)]
    try:
        started = time.monotonic()
        opened = [int(s.expect("open", SWARM_DEADLINE_S).split()[1]) for s in swarms]
        assert sum(opened) == WATCHERS
        open_took = time.monotonic() - started
        time.sleep(1.0)  # a keepalive round on every stream
        threads_during, rss_during = a.thread_count(), rss_kib(a.pid)
        print(
            f"\n{WATCHERS} watchers open in {open_took:.1f}s; node threads {threads_before} -> {threads_during}, "
            f"RSS {rss_before} -> {rss_during} KiB ({(rss_during - rss_before) / WATCHERS:.1f} KiB per watcher)"
        )
        assert threads_during <= threads_before + THREAD_SLACK

        joined = time.monotonic()
        b = node_factory(capacity="16MiB", metrics=False, env=env, args=["--node-id", "b", "--seed", a.control])
        results = [s.expect("seen", SWARM_DEADLINE_S).split() for s in swarms]
        seen = sum(int(r[1]) for r in results)
        errors = sum(int(r[3]) for r in results)
        print(f"all {seen} watchers saw b {time.monotonic() - joined:.1f}s after it was started; errors {errors}")
        assert errors == 0, [e for s in swarms for e in s.errors]
        assert seen == WATCHERS
        assert b.alive()
    finally:
        for s in swarms:
            s.stop()


# ---------------------------------------------------------------------- record-by-record merge


def rec(node_id: str, incarnation: int, state: State, data_since: int = 0) -> Member:
    return Member(node_id, incarnation, state, f"{node_id}:1", f"{node_id}:2", data_since=data_since or incarnation)


def test_a_lagging_view_does_not_resurrect_a_dead_member() -> None:
    table = MemberTable()
    assert table.merge([rec("a", 1, State.ALIVE), rec("b", 5, State.ALIVE)])
    assert table.merge([rec("a", 1, State.ALIVE), rec("b", 5, State.DEAD)])  # a node's verdict
    # A lagging node still shows b ALIVE at the incarnation declared DEAD: no change.
    assert not table.merge([rec("a", 1, State.ALIVE), rec("b", 5, State.ALIVE)])
    # Nor does a later life that kept the data the verdict named (it must wipe first).
    assert not table.merge([rec("b", 6, State.ALIVE, data_since=5)])
    assert {m.node_id: m.state for m in table.members()} == {"a": State.ALIVE, "b": State.DEAD}
    # A view without c (not yet told of its join) does not remove it; c's own news adds it.
    assert table.merge([rec("c", 9, State.ALIVE)])
    assert not table.merge([rec("a", 1, State.ALIVE), rec("b", 5, State.DEAD)])
    assert "c" in {m.node_id for m in table.members()}
    # b restarted and wiped (a higher incarnation with fresh data): it is back.
    assert table.merge([rec("b", 7, State.ALIVE)])
    assert {m.node_id: (m.incarnation, m.state) for m in table.members()}["b"] == (7, State.ALIVE)


def test_members_no_view_shows_any_more_are_forgotten_in_time() -> None:
    now = [0.0]
    table = MemberTable(forget_after_s=60.0, clock=lambda: now[0])
    table.merge([rec("a", 1, State.ALIVE), rec("b", 2, State.LEFT)])
    now[0] = 30.0
    table.merge([rec("a", 1, State.ALIVE)])  # the nodes reaped b
    assert {m.node_id for m in table.members()} == {"a", "b"}
    now[0] = 91.0
    assert table.merge([rec("a", 1, State.ALIVE)])
    assert {m.node_id for m in table.members()} == {"a"}


def test_the_table_is_bounded_whatever_views_name() -> None:
    table = MemberTable(max_members=3)
    table.merge([rec(f"n{i}", 1, State.ALIVE) for i in range(10)])
    assert len(table.members()) == 3


# ---------------------------------------------------------------------- back-off and cluster id


def test_backoff_is_bounded_jittered_and_resets() -> None:
    windows: list[float] = []

    def top(low: float, high: float) -> float:  # the widest wait the window allows
        windows.append(high)
        return high

    backoff = Backoff(initial_s=0.1, cap_s=5.0, uniform=top)
    waits = [backoff.next() for _ in range(12)]
    assert all(w <= 5.0 for w in waits) and waits[-1] == 5.0
    assert waits[:7] == sorted(waits[:7]) and waits[0] == 0.1 and waits[1] == 0.2  # doubles, from 0.1
    backoff.reset()
    assert backoff.next() == 0.1
    # The real one draws over the whole window: many sidecars do not retry together.
    real = Backoff(initial_s=0.1, cap_s=5.0)
    for _ in range(10):
        real.next()
    draws = [real.next() for _ in range(200)]
    assert all(0.0 <= d <= 5.0 for d in draws)
    assert min(draws) < 1.0 and max(draws) > 4.0


def test_cluster_identity_refuses_another_cluster_and_pins_the_first() -> None:
    configured = ClusterIdentity("prod")
    configured.check("prod", "n1")
    configured.check("", "old-node")  # a node naming no cluster
    try:
        configured.check("staging", "n9")
    except WrongCluster as exc:
        assert "staging" in str(exc) and "prod" in str(exc)
    else:
        raise AssertionError("a node of another cluster was accepted")
    pinned = ClusterIdentity()
    pinned.check("", "n0")
    assert pinned.cluster_id is None
    pinned.check("blue", "n1")
    assert pinned.cluster_id == "blue"
    try:
        pinned.check("green", "n2")
    except WrongCluster:
        pass
    else:
        raise AssertionError("a pinned client accepted another cluster")


# ---------------------------------------------------------------------- no queueing behind slow calls


def test_membership_calls_and_watches_do_not_queue_behind_slow_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    node = InProcNode("slow-stats")
    release = threading.Event()
    stats = node.server.stats

    def slow_stats() -> dict[str, Any]:
        # Only the control server's Status handlers stall (the heartbeat thread reads stats too).
        if threading.current_thread().name.startswith("memkv-control-slow"):
            release.wait(30)
        return stats()

    monkeypatch.setattr(node.server, "stats", slow_stats)
    channel = open_channel(node.control, None)
    try:
        maintenance = maintenance_pb2_grpc.MaintenanceStub(channel)
        # More stalled Status calls than the blocking executor has workers (and than the 48 threads
        # the sync server had in all): most wait in the executor's queue.
        pending = [maintenance.Status.future(maintenance_pb2.StatusRequest(), timeout=30) for _ in range(64)]
        time.sleep(0.3)
        cluster = cluster_pb2_grpc.ClusterStub(channel)
        epoch, members = view_from_proto(cluster.MemberList(cluster_pb2.MemberListRequest(), timeout=10).view)
        assert [m.node_id for m in members] == ["slow-stats"]
        first = next(iter(cluster.Watch(cluster_pb2.WatchRequest(), timeout=10)))
        assert first.view.epoch == epoch
        assert not any(f.done() for f in pending)  # answered while every statistics call still waits
        release.set()
        assert all(f.result().member.node_id == "slow-stats" for f in pending)
    finally:
        release.set()
        channel.close()
        node.stop()


# ---------------------------------------------------------------------- a node of another cluster


class _OtherCluster(cluster_pb2_grpc.ClusterServicer):
    """Streams one good view naming cluster "other" (no node of this branch has --cluster-id yet)."""

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        record = Member("x", 1, State.ALIVE, "127.0.0.1:1", "127.0.0.1:2")
        view = member_pb2.View(epoch=3, members=[member_to_proto(record)])
        yield cluster_pb2.WatchResponse(
            header=member_pb2.ResponseHeader(node_id="x", cluster_id="other"), view=view, keepalive_ms=1000
        )
        time.sleep(2)


@pytest.mark.parametrize(("configured", "accepted"), [("mine", False), ("other", True), (None, True)])
def test_a_watcher_refuses_views_of_another_cluster(configured: str | None, accepted: bool) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    cluster_pb2_grpc.add_ClusterServicer_to_server(_OtherCluster(), server)
    endpoint = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    pool = ChannelPool(None)
    seen: list[list[str]] = []
    identity = ClusterIdentity(configured)
    watcher = ViewWatcher(pool, lambda failed: [endpoint], lambda e, ms: seen.append([m.node_id for m in ms]), identity)
    try:
        watcher.start()
        time.sleep(0.5)
    finally:
        watcher.stop()
        pool.close()
        server.stop(0)
    assert (seen == [["x"]]) is accepted and (seen == []) is not accepted
    assert identity.cluster_id == (configured or "other")
