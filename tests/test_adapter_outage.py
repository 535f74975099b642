"""How the adapter tells operators about outages and misconfiguration: store outcomes that tell an
outage from a partial store, the replicas-unmet gauge and warning, the wrong-key message, the
data-port probe, and the memkv log handler inside ``lmcache server``."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from nodeproc import NodeFactory
from prometheus_client import REGISTRY
from test_adapter_unit import RecordingCluster, key, wait

from lmcache_memkv.adapter import memkv_l2_adapter as mod
from lmcache_memkv.adapter.memkv_l2_adapter import MemKVL2Adapter, MemKVL2AdapterConfig, _store_outcome
from lmcache_memkv.cluster import ClusterClient
from lmcache_memkv.cluster.bootstrap import KeyRefused, control_endpoints, probe_data_port
from lmcache_memkv.errors import ConfigError, ConnectError
from lmcache_memkv.sidecar.process import free_loopback_port

KEY = bytes(range(32))
OTHER_KEY = bytes(32)


def ops(op: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("memkv_l2_ops_total", {"op": op, "outcome": outcome}) or 0.0


class OutageCluster(RecordingCluster):
    """Stores only the keys in ``accept``; ``reachable()`` says how many nodes are up."""

    def __init__(self) -> None:
        super().__init__()
        self.accept: set[int] = set()
        self.up = 1
        self.member_states: list[str] = ["ALIVE"]

    def put(self, keys: Sequence[bytes], values: Sequence[Any]) -> list[bool]:
        self._record("put", len(keys))
        return [i in self.accept for i in range(len(keys))]

    def reachable(self) -> int:
        return self.up

    def members(self) -> list[Any]:
        return [SimpleNamespace(state=s, node_id=f"n{i}") for i, s in enumerate(self.member_states)]


@pytest.fixture
def outage() -> OutageCluster:
    return OutageCluster()


def make_adapter(cluster: RecordingCluster, **fields: Any) -> MemKVL2Adapter:
    config = MemKVL2AdapterConfig.from_dict({"servers": "127.0.0.1:1", "timeout_s": 1.0, **fields})
    return MemKVL2Adapter(config, cluster=cluster)  # type: ignore[arg-type]


def store(adapter: MemKVL2Adapter, n: int) -> bool:
    import torch
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    def obj() -> TensorMemoryObj:
        t = torch.zeros(64, dtype=torch.uint8)
        meta = MemoryObjMetadata(shape=t.shape, dtype=torch.uint8, address=0, phy_size=64, ref_count=1, pin_count=0, fmt=MemoryFormat.KV_2LTD)
        return TensorMemoryObj(t, meta, None)

    tid = adapter.submit_store_task([key(i) for i in range(n)], [obj() for _ in range(n)])
    while (result := adapter.pop_completed_store_tasks().get(tid)) is None:
        wait(adapter.get_store_event_fd())
    return bool(result.is_successful())


def test_store_outcomes_tell_an_outage_from_a_partial_store(outage: OutageCluster) -> None:
    assert _store_outcome([True, True], 1) == "ok"
    assert _store_outcome([True, False], 1) == "partial"
    assert _store_outcome([False, False], 0) == "unavailable"
    assert _store_outcome([False, False], 2) == "failed"
    adapter = make_adapter(outage)
    try:
        before = {o: ops("store", o) for o in ("ok", "partial", "unavailable", "failed")}
        outage.accept = {0}
        assert not store(adapter, 2)  # one of two stored
        outage.accept, outage.up = set(), 0
        assert not store(adapter, 2)  # the cluster is down: nothing stored, nothing reachable
        outage.up = 1
        assert not store(adapter, 2)  # a node answered but stored nothing
        outage.accept = {0, 1}
        assert store(adapter, 2)
        after = {o: ops("store", o) for o in before}
        assert {o: after[o] - before[o] for o in before} == {"ok": 1, "partial": 1, "unavailable": 1, "failed": 1}
    finally:
        adapter.close()


def test_replicas_above_the_members_in_placement_warn_once_and_set_the_gauge(
    outage: OutageCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(mod, "_USAGE_REFRESH_S", 0.05)
    gauge = lambda: REGISTRY.get_sample_value("memkv_l2_replicas_unmet")  # noqa: E731
    outage.member_states = ["ALIVE", "SUSPECT", "DEAD"]  # two in placement
    caplog.set_level(logging.INFO, logger="memkv")
    monkeypatch.setattr(logging.getLogger("memkv"), "propagate", True)  # caplog listens on the root logger
    adapter = make_adapter(outage, replicas=3)
    try:
        deadline = time.monotonic() + 5
        while gauge() != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gauge() == 1
        assert adapter.report_status()["replicas_unmet"] == 1
        time.sleep(0.3)  # several refreshes: still one warning
        warnings = [r for r in caplog.records if "replicas=3 but only 2 member(s)" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        outage.member_states = ["ALIVE", "ALIVE", "ALIVE"]
        deadline = time.monotonic() + 5
        while gauge() != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gauge() == 0
    finally:
        adapter.close()


def test_a_wrong_key_is_reported_as_a_wrong_key(node_factory: NodeFactory) -> None:
    keyed = node_factory(capacity="8MiB", metrics=False, env={"MEMKV_AUTH_KEY": KEY.hex()})
    plain = node_factory(capacity="8MiB", metrics=False)
    cases = [
        ([keyed.control], OTHER_KEY),  # another key: UNAUTHENTICATED
        ([keyed.control], None),  # no key where the node needs one: UNAUTHENTICATED
        ([plain.control], KEY),  # a key where the node has none: its answer proves nothing
    ]
    for servers, key_ in cases:
        client = ClusterClient(servers, key=key_, timeout_s=2.0)
        try:
            with pytest.raises(KeyRefused) as caught:
                client.start()
        finally:
            client.close()
        message = str(caught.value)
        assert "MEMKV_AUTH_KEY_FILE" in message and "auth_key_file" in message, message
        assert "check MEMKV_SERVERS" not in message
    # One server unreachable and one refusing: that is not (only) a key problem.
    client = ClusterClient([keyed.control, f"127.0.0.1:{free_loopback_port()}"], key=OTHER_KEY, timeout_s=2.0)
    try:
        with pytest.raises(ConnectError) as caught:
            client.start()
        assert not isinstance(caught.value, KeyRefused) and "MEMKV_SERVERS" in str(caught.value)
    finally:
        client.close()


def test_the_probe_tells_a_data_port_from_a_control_port(node_factory: NodeFactory) -> None:
    node = node_factory(capacity="8MiB", metrics=False)
    assert node.control is not None
    assert probe_data_port(node.data) is True
    assert probe_data_port(node.control) is False
    closed = f"127.0.0.1:{free_loopback_port()}"
    assert probe_data_port(closed) is None
    known: dict[str, str] = {}
    assert control_endpoints([node.control, closed], known) == [node.control, closed]
    assert known == {node.control: node.control}  # a server nobody answers on is probed again next time


@pytest.fixture
def bare_memkv_logger() -> Iterator[logging.Logger]:
    """The ``memkv`` logger without handlers, as inside ``lmcache server``; restored afterwards."""
    logger = logging.getLogger("memkv")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    root = logging.getLogger()
    root_handlers = root.handlers[:]
    logger.handlers.clear()
    try:
        yield logger
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
        root.handlers[:] = root_handlers


def test_memkv_lines_get_a_handler_once_and_never_twice(bare_memkv_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    logging.getLogger().handlers.clear()  # pytest's capture handlers (added for the call phase) too
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    handler = mod._setup_logging({"MEMKV_LOG_LEVEL": "warning"})
    assert handler is not None and bare_memkv_logger.handlers == [handler]
    assert bare_memkv_logger.level == logging.WARNING
    assert mod._setup_logging({"MEMKV_LOG_LEVEL": "info"}) is None and len(bare_memkv_logger.handlers) == 1  # idempotent
    root_stream = io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(root_stream))  # the application configures logging later
    logging.getLogger("memkv.adapter").info("hello from memkv")
    assert stream.getvalue().count("hello from memkv") == 1 and "memkv INFO" in stream.getvalue()
    assert "hello from memkv" not in root_stream.getvalue()  # not printed twice


def test_with_root_handlers_memkv_lines_propagate_there(bare_memkv_logger: logging.Logger) -> None:
    logging.getLogger().handlers.clear()
    root_stream = io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(root_stream))
    level = bare_memkv_logger.level
    assert mod._setup_logging({}) is None and bare_memkv_logger.handlers == []
    assert bare_memkv_logger.level == level  # the host application's logging decides
    assert mod._setup_logging({"MEMKV_LOG_LEVEL": "INFO"}) is None and bare_memkv_logger.level == logging.INFO
    logging.getLogger("memkv.cluster").info("routed to root")
    assert root_stream.getvalue().count("routed to root") == 1


def test_the_adapter_names_the_key_not_the_servers_and_fail_fast_raises(node_factory: NodeFactory) -> None:
    from lmcache_memkv.adapter.metrics import get_metrics
    from lmcache_memkv.adapter.settings import resolve

    node = node_factory(capacity="8MiB", metrics=False, env={"MEMKV_AUTH_KEY": KEY.hex()})
    env = {"MEMKV_AUTH_KEY": OTHER_KEY.hex()}
    strict = resolve({"servers": node.control, "timeout_s": 2.0, "fail_fast": True}, env=env)
    with pytest.raises(ConnectError) as caught:
        mod._connect(strict, get_metrics())
    assert "refused this sidecar's key" in str(caught.value) and "MEMKV_AUTH_KEY_FILE" in str(caught.value)
    assert "MEMKV_SERVERS" not in str(caught.value)

    lenient = resolve({"servers": node.control, "timeout_s": 2.0}, env={**env, "MEMKV_FAIL_FAST": "0"})
    client = mod._connect(lenient, get_metrics())  # degraded: starts, keeps trying in the background
    try:
        assert not client.connected and client.members() == [] and client.reachable() == 0
        assert client.put([b"k"], [b"v"]) == [False] and client.exists([b"k"]) == [None]
    finally:
        client.close()
    assert resolve({"servers": "h:1"}, env={"MEMKV_FAIL_FAST": "true"}).fail_fast
    with pytest.raises(ConfigError, match="'fail_fast' must be true or false"):
        resolve({"servers": "h:1", "fail_fast": "maybe"}, env={})


def test_replicas_above_live_nodes_with_a_real_cluster(
    node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(mod, "_USAGE_REFRESH_S", 0.1)
    monkeypatch.setattr(logging.getLogger("memkv"), "propagate", True)  # caplog listens on the root logger
    caplog.set_level(logging.INFO, logger="memkv")
    node = node_factory(capacity="8MiB", metrics=False)
    adapter = MemKVL2Adapter(MemKVL2AdapterConfig.from_dict({"servers": node.control, "replicas": 2, "timeout_s": 2.0}))
    try:
        deadline = time.monotonic() + 10
        while REGISTRY.get_sample_value("memkv_l2_replicas_unmet") != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert REGISTRY.get_sample_value("memkv_l2_replicas_unmet") == 1
        assert adapter.report_status()["replicas_unmet"] == 1 and not adapter.report_status()["degraded"]
        assert any("replicas=2 but only 1 member(s)" in r.getMessage() for r in caplog.records)
    finally:
        adapter.close()


def test_help_says_what_auto_and_servers_really_do() -> None:
    text = MemKVL2AdapterConfig.help()
    # auto's rule as the code applies it (_choose_transport): verbs only where both ends can.
    assert "auto: verbs\n  to nodes that advertise rdma when this host has a usable device, else TCP" in text
    assert "or the sidecar refuses to start, naming why" in text
    assert "data endpoints (:9900" in text and "fail_fast" in text and "MEMKV_FAIL_FAST" in text
