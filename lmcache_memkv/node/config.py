"""Node configuration with validation that names the offending flag."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

from lmcache_memkv.endpoints import format_endpoint, parse_endpoint
from lmcache_memkv.wire.limits import Limits

_CLUSTER_ID = re.compile(r"[A-Za-z0-9._-]{1,63}")


def default_node_id(port: int) -> str:
    return f"{socket.gethostname()}-{port}"


@dataclass
class NodeConfig:
    listen: str = "127.0.0.1:9900"
    capacity: int = 1 << 30
    node_id: str = ""
    metrics_listen: str | None = None
    auth_key: bytes | None = None
    limits: Limits = field(default_factory=Limits)
    frame_timeout_s: float = 10.0  # a peer that stalls mid-frame longer than this is dropped
    idle_timeout_s: float = 0.0  # 0: idle connections stay open
    max_connections: int = 4096  # authenticated connections (the event loop holds them; no thread each)
    workers: int = 32  # threads serving ready requests (value transfers), whatever the connection count
    transfers: int = 0  # large TCP value transfers moving at once, the rest queue (0: one per CPU, at least 2)
    auth_timeout_s: float = 2.0  # a new connection must authenticate within this
    max_unauth_connections: int = 64  # connections not yet authenticated, all peers together
    max_unauth_per_host: int = 8  # ... and from one peer address
    max_lease_ttl_s: float = 300.0  # longer lease requests are cut to this
    lease_budget: int | None = None  # arena bytes one client may hold leased (default: half)
    max_tombstones: int = 100_000  # deleted keys remembered; past it the oldest become a version floor
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    # Control plane (gRPC): see lmcache_memkv.control.
    control_listen: str | None = None  # default: data port + 1
    advertise_host: str | None = None  # what peers and clients dial, when the bind address is not it
    seeds: list[str] = field(default_factory=list)
    heartbeat_interval_s: float = 0.5
    suspect_after_s: float = 1.5
    dead_after_s: float = 3.0
    indirect_probes: int = 3  # SWIM's k: members asked to probe a target that missed a direct ping
    reap_after_s: float = 300.0  # DEAD and LEFT members leave the view this long after the verdict
    cluster_id: str = "memkv"  # every node of a cluster has the same; other clusters' calls are refused
    tls_cert: str | None = None
    tls_key: str | None = None
    # Watch streams served at once: each costs memory (a coroutine and gRPC's stream buffers,
    # no thread), so the cap only bounds that; far above a fleet's sidecars.
    max_watchers: int = 10_000
    # RDMA data path: None finds a device (MEMKV_RDMA_DEVICES first) and falls back to TCP alone;
    # a name must open or the node refuses to start; "none" turns verbs off.
    rdma_device: str | None = None
    rdma_port: int = 1
    rdma_gid_index: int = 0
    # RDMA sessions (one RC queue pair each, one per client process) held at once. At the cap a
    # Hello takes the slot of a session idle over 60 s, or is refused (RESOURCE_EXHAUSTED).
    max_rdma_sessions: int = 1024
    # True when node_id was derived from the listen address; with port 0 the server
    # replaces it once the real port is known (else every ephemeral node is "HOST-0").
    node_id_auto: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        host, port = parse_endpoint(self.listen, field="--listen")
        if self.capacity < 1 << 20:
            raise ValueError(f"--capacity must be at least 1MiB, got {self.capacity} bytes")
        if not self.node_id:
            self.node_id = default_node_id(port)
            self.node_id_auto = True
        if len(self.node_id.encode()) > 255:
            raise ValueError("--node-id must be at most 255 bytes")
        if self.metrics_listen:
            parse_endpoint(self.metrics_listen, field="--metrics-listen")
        if self.control_listen is None:
            self.control_listen = format_endpoint(host, port + 1 if port else 0)
        parse_endpoint(self.control_listen, field="--control-listen")
        if self.advertise_host is not None:
            if not self.advertise_host.strip() or any(c.isspace() for c in self.advertise_host) or "/" in self.advertise_host:
                raise ValueError(f"--advertise-host must be a host name or address, got {self.advertise_host!r}")
            if ":" in self.advertise_host and not self.advertise_host.count(":") > 1:
                raise ValueError(f"--advertise-host takes a host without a port, got {self.advertise_host!r}")
        for seed in self.seeds:
            parse_endpoint(seed, field="--seed")
        for name in ("frame_timeout_s", "drain_timeout_s", "heartbeat_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 1 <= self.workers <= 1024:
            raise ValueError(f"--workers must be in 1..1024, got {self.workers}")
        if not 0 <= self.transfers <= 1024:
            raise ValueError(f"--transfers must be in 0..1024 (0: one per CPU), got {self.transfers}")
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be at least 1, got {self.max_connections}")
        for flag, value in (
            ("--max-unauth-connections", self.max_unauth_connections),
            ("--max-unauth-per-host", self.max_unauth_per_host),
            ("--max-tombstones", self.max_tombstones),
            ("--max-watchers", self.max_watchers),
            ("--max-rdma-sessions", self.max_rdma_sessions),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.auth_timeout_s <= 0:
            raise ValueError(f"--auth-timeout must be positive, got {self.auth_timeout_s}")
        if self.max_lease_ttl_s <= 0:
            raise ValueError(f"--max-lease-ttl must be positive, got {self.max_lease_ttl_s}")
        if self.lease_budget is not None and self.lease_budget < 0:
            raise ValueError(f"--lease-budget must not be negative, got {self.lease_budget}")
        if self.idle_timeout_s < 0:
            raise ValueError(f"--idle-timeout must not be negative, got {self.idle_timeout_s}")
        if not self.heartbeat_interval_s < self.suspect_after_s < self.dead_after_s:
            raise ValueError(
                "heartbeat timeouts must satisfy heartbeat-interval < suspect-after < dead-after, got "
                f"{self.heartbeat_interval_s} < {self.suspect_after_s} < {self.dead_after_s}"
            )
        if not 0 <= self.indirect_probes <= 16:
            raise ValueError(f"--indirect-probes must be 0-16, got {self.indirect_probes}")
        if self.reap_after_s <= 0:
            raise ValueError(f"--reap-after must be positive, got {self.reap_after_s}")
        if not _CLUSTER_ID.fullmatch(self.cluster_id):
            raise ValueError(
                f"--cluster-id must be 1-63 characters of letters, digits, '.', '_' or '-', got {self.cluster_id!r}"
            )
        if not 1 <= self.rdma_port <= 255:
            raise ValueError(f"--rdma-port must be in 1..255, got {self.rdma_port}")
        if not 0 <= self.rdma_gid_index <= 255:
            raise ValueError(f"--rdma-gid-index must be in 0..255, got {self.rdma_gid_index}")
        if self.rdma_device is not None and not self.rdma_device.strip():
            raise ValueError("--rdma-device must name a device (or 'none')")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
