"""Helpers for the control-plane and cluster tests: in-process nodes, polling, raw gRPC calls."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc

from lmcache_memkv.control.auth import proof_metadata
from lmcache_memkv.control.channel import open_channel
from lmcache_memkv.control.convert import view_from_proto
from lmcache_memkv.control.member import Member
from lmcache_memkv.control.node_service import ControlPlane, start_control_plane
from lmcache_memkv.control.response_auth import MEMBER_LIST, check_reply, fresh_nonce
from lmcache_memkv.node.config import NodeConfig
from lmcache_memkv.node.server import NodeServer
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc

# Fast failure detection for tests; bounds in the tests are stated in these units.
HEARTBEAT_S = 0.2
SUSPECT_S = 0.6
DEAD_S = 1.2
FAST_ARGS = ["--heartbeat-interval", str(HEARTBEAT_S), "--suspect-after", str(SUSPECT_S), "--dead-after", str(DEAD_S)]

T = TypeVar("T")


def wait_until(what: str, predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.02) -> tuple[T, float]:
    """Poll until ``predicate()`` is truthy; (its value, seconds it took). AssertionError on timeout."""
    started = time.monotonic()
    last: T | None = None
    while True:
        try:
            last = predicate()
        except (grpc.RpcError, OSError):
            last = None
        if last:
            return last, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s:.2f}s: {what} (last: {last!r})")
        time.sleep(interval_s)


def member_list(endpoint: str, key: bytes | None = None, timeout_s: float = 2.0) -> tuple[int, list[Member]]:
    """The node's view; with a key, only if its answer proves that key (else ReplyRefused)."""
    channel = open_channel(endpoint, key)
    try:
        request = cluster_pb2.MemberListRequest(nonce=fresh_nonce())
        reply = cluster_pb2_grpc.ClusterStub(channel).MemberList(request, timeout=timeout_s)
        check_reply(key, MEMBER_LIST, request, reply)
        return view_from_proto(reply.view)
    finally:
        channel.close()


def states(endpoint: str, key: bytes | None = None) -> dict[str, str]:
    return {m.node_id: str(m.state) for m in member_list(endpoint, key)[1]}


def raw_call(
    channel: grpc.Channel, method: str, payload: bytes, metadata: Sequence[tuple[str, str]] = (), timeout_s: float = 2.0
) -> grpc.RpcError:
    """Send raw bytes to ``method``; return the RpcError it must fail with."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        call(payload, metadata=list(metadata), timeout=timeout_s)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{method} accepted {payload!r}")


def signed(key: bytes, method: str, target: str, body: bytes = b"") -> list[tuple[str, str]]:
    """Metadata proving ``key`` for one call of ``method`` with ``body`` to the node dialed as ``target``."""
    return proof_metadata(key, method, target, body)


class InProcNode:
    """A node (data plane and control plane) inside the test process."""

    def __init__(
        self,
        node_id: str,
        seeds: Sequence[str] = (),
        key: bytes | None = None,
        capacity: int = 8 << 20,
        tls: tuple[str, str] | None = None,
        cluster_id: str = "memkv",
    ) -> None:
        self.config = NodeConfig(
            listen="127.0.0.1:0",
            capacity=capacity,
            node_id=node_id,
            auth_key=key,
            control_listen="127.0.0.1:0",
            seeds=list(seeds),
            heartbeat_interval_s=HEARTBEAT_S,
            suspect_after_s=SUSPECT_S,
            dead_after_s=DEAD_S,
            tls_cert=tls[0] if tls else None,
            tls_key=tls[1] if tls else None,
            cluster_id=cluster_id,
        )
        self.node_id = node_id
        self.server = NodeServer(self.config)
        self.server.start()
        try:
            self.plane: ControlPlane = start_control_plane(self.server, self.config)
        except BaseException:
            self.server.stop(0)
            raise
        self.data = self.server.endpoint
        self.control = self.plane.endpoint
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.plane.stop()
            self.server.stop(0)


class InProcCluster:
    """Several in-process nodes joined through the first; ``stop()`` stops them all."""

    def __init__(self) -> None:
        self.nodes: list[InProcNode] = []

    def add(self, node_id: str, key: bytes | None = None, **kw: object) -> InProcNode:
        seeds = [self.nodes[0].control] if self.nodes else []
        node = InProcNode(node_id, seeds=seeds, key=key, **kw)  # type: ignore[arg-type]
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def wait_converged(self, timeout_s: float = 5.0, key: bytes | None = None) -> float:
        want = {n.node_id: "ALIVE" for n in self.nodes}
        _, took = wait_until(
            "every node sees every node ALIVE",
            lambda: all(states(n.control, key) == want for n in self.nodes),
            timeout_s,
        )
        return took


class Views:
    """Reads many nodes' views often, over channels kept open (a new channel per read costs more
    than the read); ``close()`` when done."""

    def __init__(self, endpoints: Sequence[str], key: bytes | None = None) -> None:
        self._key = key
        self._channels = {e: open_channel(e, key) for e in endpoints}

    def of(self, endpoint: str, timeout_s: float = 1.0) -> dict[str, tuple[int, str]] | None:
        """``{node_id: (incarnation, state)}`` as ``endpoint`` sees it; None if it does not answer."""
        request = cluster_pb2.MemberListRequest(nonce=fresh_nonce())
        try:
            reply = cluster_pb2_grpc.ClusterStub(self._channels[endpoint]).MemberList(request, timeout=timeout_s)
        except grpc.RpcError:
            return None
        check_reply(self._key, MEMBER_LIST, request, reply)
        return {m.node_id: (m.incarnation, str(m.state)) for m in view_from_proto(reply.view)[1]}

    def all(self) -> dict[str, dict[str, tuple[int, str]] | None]:
        return {e: self.of(e) for e in self._channels}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
