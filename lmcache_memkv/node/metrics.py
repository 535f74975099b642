"""Prometheus metrics of a node, on its own registry, and the node's HTTP port (``--metrics-listen``):
``/metrics``, ``/healthz`` (the process is up) and ``/readyz`` (serving; 503 while starting or draining).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lmcache_memkv import __version__
from lmcache_memkv.endpoints import parse_endpoint
from lmcache_memkv.wire.constants import VERSION

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _StoreCollector(Collector):
    """Reads the store's counters at scrape time, so /metrics and STATS never disagree."""

    def __init__(self, node_id: str, snapshot: Callable[[], dict[str, int]]) -> None:
        self._node_id = node_id
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._snapshot()
        gauges = {
            "memkv_node_arena_capacity_bytes": ("Arena size in bytes.", s["capacity_bytes"]),
            "memkv_node_arena_used_bytes": ("Arena bytes allocated to values (aligned).", s["used_bytes"]),
            "memkv_node_value_bytes": ("Bytes of stored values.", s["value_bytes"]),
            "memkv_node_keys": ("Keys stored.", s["keys"]),
            "memkv_node_leases": ("Leases currently held.", s["leases"]),
            "memkv_node_leased_bytes": ("Arena bytes held by leases.", s["leased_bytes"]),
            "memkv_node_tombstones": ("Deleted keys remembered so older writes cannot bring them back.", s["tombstones"]),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(name, doc, labels=["node"])
            g.add_metric([self._node_id], value)
            yield g
        counters = {
            "memkv_node_hits": ("GET lookups that found the key.", s["hits"]),
            "memkv_node_misses": ("GET lookups that missed.", s["misses"]),
            "memkv_node_evictions": ("Entries evicted (LRU) to make room.", s["evictions"]),
            "memkv_node_evicted_bytes": ("Value bytes evicted.", s["evicted_bytes"]),
            "memkv_node_leases_granted": ("Leases granted by EXISTS.", s["leases_granted"]),
            "memkv_node_leases_released": ("Leases released by RELEASE.", s["leases_released"]),
            "memkv_node_leases_expired": ("Leases that ran out their TTL.", s["leases_expired"]),
            "memkv_node_no_space": ("PUT items refused because nothing evictable made room.", s["no_space"]),
            "memkv_node_leases_denied": ("Leases refused for a spent lease budget.", s["leases_denied"]),
            "memkv_node_stale_writes": ("PUT or DELETE items older than the stored version, refused.", s["stale"]),
            "memkv_node_invalidations": ("Older values dropped because a newer write could not be stored.", s["invalidations"]),
            "memkv_node_wipes": ("Times the node dropped all its data to fence itself (stall or DEAD verdict).", s["wipes"]),
        }
        for name, (doc, value) in counters.items():
            c = CounterMetricFamily(name, doc, labels=["node"])
            c.add_metric([self._node_id], value)
            yield c


class NodeMetrics:
    def __init__(self, node_id: str, snapshot: Callable[[], dict[str, int]]) -> None:
        self.registry = r = CollectorRegistry()
        node = ["node"]
        self.ops = Counter(
            "memkv_node_ops", "Requests served, by opcode and outcome.", [*node, "op", "outcome"], registry=r
        )
        self.items = Counter("memkv_node_items", "Keys handled inside batches, by opcode.", [*node, "op"], registry=r)
        self.bytes_in = Counter("memkv_node_received_bytes", "Value bytes received (PUT).", node, registry=r)
        self.bytes_out = Counter("memkv_node_sent_bytes", "Value bytes sent (GET).", node, registry=r)
        # Value bytes by transport: over RDMA the node's own verbs moved them, over TCP its sockets.
        self.transport_bytes = Counter(
            "memkv_node_transport_bytes",
            "Value bytes moved, by transport (tcp, rdma) and direction (in: PUT, out: GET).",
            [*node, "transport", "direction"],
            registry=r,
        )
        self.rdma_fences = Counter(
            "memkv_node_rdma_fences", "RDMA queue pairs moved to ERR after a failed or timed-out transfer.", node, registry=r
        )
        self.latency = Histogram(
            "memkv_node_request_seconds", "Time to serve a request.", [*node, "op"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.connections = Gauge("memkv_node_connections", "Open client connections.", node, registry=r)
        self.transfers_waiting = Gauge(
            "memkv_node_transfers_waiting", "Large TCP value transfers queued for a transfer slot (--transfers).", node, registry=r
        )
        self.accepted = Counter("memkv_node_connections_accepted", "Connections accepted.", node, registry=r)
        self.auth_failures = Counter(
            "memkv_node_auth_failures", "Connections that failed authentication.", node, registry=r
        )
        self.protocol_errors = Counter(
            "memkv_node_protocol_errors", "Connections closed for bad input, by reason.", [*node, "reason"], registry=r
        )
        self.control_auth_failures = Counter(
            "memkv_node_control_auth_failures",
            "Control-plane (gRPC) calls refused for a missing or wrong auth proof, by method.",
            [*node, "method"],
            registry=r,
        )
        # Membership traffic (Ping, PingReq, anti-entropy, Join, Leave): serialised request and
        # response bytes this node sent and received, both as caller and as callee.
        self.gossip_bytes = Counter(
            "memkv_gossip_bytes",
            "Serialised membership-protocol protobuf bytes, by direction (sent, received).",
            [*node, "direction"],
            registry=r,
        )
        self.swim_probes = Counter(
            "memkv_swim_probes",
            "SWIM probes by outcome: direct (acked), indirect (acked only through PingReq helpers), "
            "none (no ack: the target became SUSPECT).",
            [*node, "result"],
            registry=r,
        )
        build = Gauge("memkv_build_info", "Version of this node and of its data-plane protocol.", ["version", "protocol"], registry=r)
        build.labels(__version__, str(VERSION)).set(1)
        ProcessCollector(registry=r)  # memkv_... would hide them from the usual process_* dashboards
        PlatformCollector(registry=r)
        GCCollector(registry=r)  # python_gc_*: how often the collector runs, by generation
        r.register(_StoreCollector(node_id, snapshot))
        self.node_id = node_id

    def serve(self, listen: str, ready: Callable[[], bool] = lambda: True) -> tuple[str, int]:
        """Serve /metrics, /healthz and /readyz on ``listen``; ``ready`` answers /readyz."""
        host, port = parse_endpoint(listen, field="--metrics-listen")
        handler = type("Handler", (_Handler,), {"registry": self.registry, "ready": staticmethod(ready)})
        try:
            server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise OSError(exc.errno, f"--metrics-listen {listen}: cannot bind: {exc.strerror}") from None
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="memkv-http", daemon=True).start()
        bound = server.server_address
        return str(bound[0]), int(bound[1])


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    ready: Callable[[], bool]

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._reply(200, b"ok\n")
        elif path == "/readyz":
            if self.ready():
                self._reply(200, b"ready\n")
            else:
                self._reply(503, b"not ready: starting or draining\n")
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a probe that gave up: nothing to tell it, nothing worth a traceback in the log

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes and probes every few seconds would drown the node's log
