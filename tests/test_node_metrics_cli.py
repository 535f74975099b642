"""The node's command line (ready line, ids, flag errors) and its Prometheus /metrics."""

from __future__ import annotations

import socket
import subprocess

import pytest
from nodeproc import NodeFactory, NodeProcess, memkv_command, node_env, parse_ready_line

from lmcache_memkv.wire.constants import Status

MiB = 1 << 20


def test_parse_ready_line_by_key() -> None:
    node_id, fields = parse_ready_line("memkv node n-1 ready data=127.0.0.1:5 pid=9 control=127.0.0.1:6 metrics=h:7")
    assert node_id == "n-1"
    assert fields == {"data": "127.0.0.1:5", "pid": "9", "control": "127.0.0.1:6", "metrics": "h:7"}
    with pytest.raises(ValueError):
        parse_ready_line("something else")


def test_ready_line_and_default_node_id(node_factory: NodeFactory) -> None:
    a, b = node_factory(), node_factory(metrics=False)
    assert int(a.fields["pid"]) == a.pid
    port = a.address[1]
    assert port != 0 and a.node_id == f"{socket.gethostname()}-{port}"  # the bound port, not "-0"
    assert a.node_id != b.node_id and b.metrics is None
    with a.client() as c:
        assert c.stats()["node_id"] == a.node_id


def test_explicit_node_id(node_factory: NodeFactory) -> None:
    node = node_factory(args=["--node-id", "mem-7"])
    assert node.node_id == "mem-7"
    assert 'node="mem-7"' in node.scrape()


def run_node_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*memkv_command(), "node", *args]
    return subprocess.run(cmd, env=node_env(), capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "nohost"], "--listen: invalid address 'nohost'"),
        (["--listen", "127.0.0.1:70000"], "--listen: port 70000 out of range"),
        (["--capacity", "100KiB"], "--capacity must be at least 1MiB"),
        (["--capacity", "12 parsecs"], "invalid size unit"),
        (["--metrics-listen", "x"], "--metrics-listen: invalid address"),
        (["--frame-timeout", "0"], "--frame-timeout must be positive"),
    ],
)
def test_invalid_flags_fail_at_start(args: list[str], message: str) -> None:
    proc = run_node_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_port_in_use_fails_with_exit_1() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        proc = run_node_cli("--listen", f"127.0.0.1:{port}", "--capacity", "1MiB")
        assert proc.returncode == 1
        assert f"--listen 127.0.0.1:{port}: cannot bind" in proc.stderr
    finally:
        taken.close()


def test_metrics_cover_ops_bytes_hits_leases_connections_and_arena(node_factory: NodeFactory) -> None:
    node: NodeProcess = node_factory(capacity="2MiB")
    with node.client() as c:
        c.put([b"a", b"b"], [b"x" * MiB, b"y" * 1000])
        c.get_into([b"a", b"zz"], [bytearray(MiB), bytearray(1)])
        lease_id = c.lookup([b"b"], lease_ttl_s=60).lease_ids[0]
        assert c.put([b"c"], [b"z" * MiB]) == [Status.OK]  # evicts "a" ("b" is leased)
        c.release([lease_id])
        m = node.metric
        assert m("memkv_node_ops_total", op="put", outcome="ok") == 2
        assert m("memkv_node_ops_total", op="get", outcome="partial") == 1
        assert m("memkv_node_ops_total", op="exists") == 1
        assert m("memkv_node_received_bytes_total") == 2 * MiB + 1000
        assert m("memkv_node_sent_bytes_total") == MiB
        assert (m("memkv_node_hits_total"), m("memkv_node_misses_total")) == (1, 1)
        assert m("memkv_node_evictions_total") == 1
        assert (m("memkv_node_leases_granted_total"), m("memkv_node_leases_released_total")) == (1, 1)
        assert m("memkv_node_leases") == 0
        assert m("memkv_node_connections") == 1 and m("memkv_node_connections_accepted_total") == 1
        assert m("memkv_node_auth_failures_total") == 0
        assert m("memkv_node_arena_capacity_bytes") == 2 * MiB
        assert m("memkv_node_arena_used_bytes") == MiB + 1024  # aligned extents
        assert m("memkv_node_keys") == 2
        assert m("memkv_node_request_seconds_count", op="put") == 2
        assert f'node="{node.node_id}"' in node.scrape()
