"""Health: /healthz and /readyz on the node's HTTP port, grpc.health.v1 on its control port
(answered without the fleet key, which probes cannot sign), both failing while the node starts
or drains; process, build-info and control-plane auth-failure metrics."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import pytest
import rawwire
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nodeproc import NodeFactory, memkv_command, node_env

from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc
from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import VERSION, Status
from lmcache_memkv.wire.messages import PutRequest, PutResponse, encode

KEY_HEX = "ab" * 32


def http_get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def grpc_health(control: str) -> int:
    with grpc.insecure_channel(control) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(reply.status)


def test_health_endpoints_answer_when_serving(node_factory: NodeFactory) -> None:
    node = node_factory()
    assert node.metrics is not None and node.control is not None
    assert http_get(node.metrics, "/healthz") == (200, "ok\n")
    assert http_get(node.metrics, "/readyz") == (200, "ready\n")
    status, body = http_get(node.metrics, "/metrics")
    assert status == 200 and "memkv_node_keys" in body
    assert http_get(node.metrics, "/")[0] == 404 and http_get(node.metrics, "/env")[0] == 404
    assert grpc_health(node.control) == health_pb2.HealthCheckResponse.SERVING


def test_grpc_health_needs_no_key_but_memkv_methods_do(node_factory: NodeFactory) -> None:
    node = node_factory(env={"MEMKV_AUTH_KEY": KEY_HEX})
    assert node.control is not None
    assert grpc_health(node.control) == health_pb2.HealthCheckResponse.SERVING  # unsigned, answered
    with grpc.insecure_channel(node.control) as channel:
        with pytest.raises(grpc.RpcError) as err:
            cluster_pb2_grpc.ClusterStub(channel).MemberList(cluster_pb2.MemberListRequest(), timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # A Watch stream costs the node memory for its lifetime: unproven callers do not get one.
        with pytest.raises(grpc.RpcError) as err:
            next(iter(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)))
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # A made-up method is refused too, and counted without growing the label set.
        with pytest.raises(grpc.RpcError):
            channel.unary_unary("/memkv.v1.Cluster/Nope")(b"", timeout=5)
    assert node.metric("memkv_node_control_auth_failures_total", method="/memkv.v1.Cluster/MemberList") == 1
    assert node.metric("memkv_node_control_auth_failures_total", method="/grpc.health.v1.Health/Watch") == 1
    assert node.metric("memkv_node_control_auth_failures_total", method="unknown") == 1


def test_process_and_build_info_metrics(node_factory: NodeFactory) -> None:
    node = node_factory()
    text = node.scrape()
    assert f'memkv_build_info{{protocol="{VERSION}",version="' in text
    assert node.metric("process_resident_memory_bytes") > 0
    assert node.metric("process_open_fds") > 0
    assert 'python_info{implementation="CPython"' in text


def test_not_ready_while_draining(node_factory: NodeFactory) -> None:
    node = node_factory(args=["--drain-timeout", "20"])
    assert node.metrics is not None and node.control is not None
    value = b"v" * (4 << 20)
    sock = rawwire.connect(node.address, timeout_s=20)
    try:
        # A request in flight (half its value sent) keeps the node draining until we finish it.
        sock.sendall(encode(PutRequest(keys=[b"k"], sizes=[len(value)], versions=CLOCK.next(1)), 7) + value[:1024])
        time.sleep(0.1)
        node.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while http_get(node.metrics, "/readyz")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http_get(node.metrics, "/readyz")[0] == 503
        assert http_get(node.metrics, "/healthz")[0] == 200  # up, just not taking traffic
        assert grpc_health(node.control) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert node.alive()
        sock.sendall(value[1024:])
        _, reply, _ = rawwire.read_frame(sock)
        assert reply == PutResponse(statuses=[Status.OK])  # the request in flight was served
    finally:
        sock.close()
    assert node.wait(20) == 0


def test_not_ready_while_starting() -> None:
    # A seed that accepts TCP but never answers holds the node in its (bounded) join wait,
    # after the HTTP port is up: /readyz must say 503 then, and 200 once the node serves.
    silent = socket.create_server(("127.0.0.1", 0))
    probe = socket.create_server(("127.0.0.1", 0))
    metrics_port = probe.getsockname()[1]
    probe.close()
    cmd = [
        *memkv_command(), "node", "--listen", "127.0.0.1:0", "--capacity", "16MiB",
        "--metrics-listen", f"127.0.0.1:{metrics_port}", "--seed", f"127.0.0.1:{silent.getsockname()[1]}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=node_env())
    address = f"127.0.0.1:{metrics_port}"
    try:
        first = None
        deadline = time.monotonic() + 30
        while first is None and time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                first = http_get(address, "/readyz")[0]
            time.sleep(0.02)
        assert first == 503
        assert proc.stdout is not None and " ready " in proc.stdout.readline().decode()
        assert http_get(address, "/readyz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        silent.close()

