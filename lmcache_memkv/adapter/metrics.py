"""The adapter's Prometheus metrics, on prometheus-client's default registry.

``lmcache server`` serves that registry on its admin port (``/metrics``), so these
appear next to LMCache's own ``lmcache_mp_*`` series. Created once per process: several
adapter instances (or tests) share them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class AdapterMetrics:
    ops: Counter
    keys: Counter
    bytes: Counter
    wire_bytes: Counter
    latency: Histogram
    node_errors: Counter
    view_epoch: Gauge
    members: Gauge
    leases_held: Gauge
    replicas_unmet: Gauge
    connected: Gauge


_lock = threading.Lock()
_metrics: AdapterMetrics | None = None


def get_metrics() -> AdapterMetrics:
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = AdapterMetrics(
                ops=Counter("memkv_l2_ops", "Adapter tasks by operation and outcome.", ["op", "outcome"]),
                keys=Counter("memkv_l2_keys", "Keys handled by operation and outcome (hit, miss, stored, failed).", ["op", "outcome"]),
                bytes=Counter("memkv_l2_bytes", "Value bytes stored or loaded, by direction (store, load) and the adapter's data plane (tcp, rdma).", ["direction", "transport"]),
                wire_bytes=Counter("memkv_l2_wire_bytes", "Value bytes moved per node call (replicas each count), by the transport that moved them (tcp, rdma) and direction.", ["transport", "direction"]),
                latency=Histogram("memkv_l2_op_seconds", "Task latency from submit to completion.", ["op"], buckets=_BUCKETS),
                node_errors=Counter("memkv_l2_node_errors", "Failed calls to a node, by kind (timeout, connect, protocol, server; busy: still queued behind that node's other calls at the deadline).", ["node", "kind"]),
                view_epoch=Gauge("memkv_l2_view_epoch", "Epoch of the cluster view the adapter routes by."),
                members=Gauge("memkv_l2_members", "Cluster members by state.", ["state"]),
                leases_held=Gauge("memkv_l2_leases_held", "Leases this adapter holds (locked keys not yet unlocked)."),
                replicas_unmet=Gauge(
                    "memkv_l2_replicas_unmet",
                    "Configured replicas minus the members in placement (ALIVE or SUSPECT), when positive; 0 when met.",
                ),
                connected=Gauge(
                    "memkv_l2_cluster_connected",
                    "1 once the adapter holds a cluster view; 0 while a degraded start still retries in the background.",
                ),
            )
        return _metrics
