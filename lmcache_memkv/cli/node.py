"""``memkv node``: run a MemKV memory node."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Annotated

import typer

HELP = "Run a MemKV node: a memory server that pools this host's DRAM for LMCache."
EXAMPLE = "Example: memkv node --listen 127.0.0.1:9900 --capacity 8GiB --metrics-listen 127.0.0.1:9910"


def node(
    listen: Annotated[str, typer.Option(help="Data-plane address HOST:PORT.", envvar="MEMKV_LISTEN")] = "127.0.0.1:9900",
    capacity: Annotated[str, typer.Option(help="Arena size, e.g. 512MiB or 64GiB.", envvar="MEMKV_CAPACITY")] = "1GiB",
    node_id: Annotated[str, typer.Option(help="Unique node name (default: HOSTNAME-PORT).", envvar="MEMKV_NODE_ID")] = "",
    metrics_listen: Annotated[
        str | None, typer.Option(help="Serve Prometheus /metrics on HOST:PORT.", envvar="MEMKV_METRICS_LISTEN")
    ] = None,
    auth_key_file: Annotated[
        str | None, typer.Option(help="File holding the 64-hex auth key (else MEMKV_AUTH_KEY; unset: no auth).", envvar="MEMKV_AUTH_KEY_FILE")
    ] = None,
    control_listen: Annotated[
        str | None, typer.Option(help="gRPC control address HOST:PORT (default: data port + 1).")
    ] = None,
    advertise_host: Annotated[
        str | None,
        typer.Option(help="Host name or address peers and clients use to reach this node (e.g. the pod's DNS name when listening on 0.0.0.0).", envvar="MEMKV_ADVERTISE_HOST"),
    ] = None,
    seed: Annotated[list[str] | None, typer.Option(help="Control endpoint of a cluster member to join; repeatable.")] = None,
    heartbeat_interval: Annotated[float, typer.Option(help="Seconds between heartbeats.")] = 0.5,
    suspect_after: Annotated[float, typer.Option(help="Seconds without heartbeat before a member is SUSPECT.")] = 1.5,
    dead_after: Annotated[float, typer.Option(help="Seconds without heartbeat before a member is DEAD.")] = 3.0,
    tls_cert: Annotated[str | None, typer.Option(help="PEM certificate for the control plane (enables TLS).")] = None,
    tls_key: Annotated[str | None, typer.Option(help="PEM private key for --tls-cert.")] = None,
    max_batch: Annotated[int, typer.Option(help="Most keys in one request.")] = 1024,
    max_value: Annotated[str, typer.Option(help="Largest value accepted.")] = "1GiB",
    max_meta: Annotated[str, typer.Option(help="Largest frame meta (keys and sizes) accepted.")] = "1MiB",
    frame_timeout: Annotated[float, typer.Option(help="Seconds a client may take to finish a frame it started.")] = 10.0,
    max_frame_payload: Annotated[str, typer.Option(help="Most value bytes one request may carry.")] = "1GiB",
    max_connections: Annotated[int, typer.Option(help="Most authenticated client connections open at once (one thread each).")] = 4096,
    max_unauth_connections: Annotated[
        int, typer.Option(help="Most connections still authenticating, all peers together; the oldest gives way to a new one.")
    ] = 64,
    max_unauth_per_host: Annotated[int, typer.Option(help="Most connections still authenticating from one peer address.")] = 8,
    auth_timeout: Annotated[float, typer.Option(help="Seconds a new connection has to authenticate.")] = 2.0,
    idle_timeout: Annotated[float, typer.Option(help="Seconds an idle authenticated connection stays open (0: no limit).")] = 0.0,
    max_lease_ttl: Annotated[float, typer.Option(help="Longest lease a client may take, in seconds; longer requests are cut.")] = 300.0,
    lease_budget: Annotated[
        str | None, typer.Option(help="Arena bytes one client may hold leased (default: half of --capacity).")
    ] = None,
    max_tombstones: Annotated[
        int, typer.Option(help="Deleted keys remembered so older writes cannot revive them; past it, older writes are refused.")
    ] = 100_000,
    drain_timeout: Annotated[float, typer.Option(help="Seconds SIGTERM waits for in-flight requests.")] = 30.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    from lmcache_memkv.auth import load_key
    from lmcache_memkv.node.config import NodeConfig
    from lmcache_memkv.wire.limits import Limits

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = NodeConfig(
            listen=listen,
            capacity=_size("--capacity", capacity),
            node_id=node_id,
            metrics_listen=metrics_listen,
            auth_key=load_key(auth_key_file),
            limits=Limits(
                max_batch=max_batch,
                max_value_len=_size("--max-value", max_value),
                max_meta_len=_size("--max-meta", max_meta),
                max_payload_len=_size("--max-frame-payload", max_frame_payload),
            ),
            frame_timeout_s=frame_timeout,
            drain_timeout_s=drain_timeout,
            max_connections=max_connections,
            max_unauth_connections=max_unauth_connections,
            max_unauth_per_host=max_unauth_per_host,
            auth_timeout_s=auth_timeout,
            idle_timeout_s=idle_timeout,
            max_lease_ttl_s=max_lease_ttl,
            lease_budget=_size("--lease-budget", lease_budget) if lease_budget is not None else None,
            max_tombstones=max_tombstones,
            control_listen=control_listen,
            advertise_host=advertise_host,
            seeds=list(seed or []),
            heartbeat_interval_s=heartbeat_interval,
            suspect_after_s=suspect_after,
            dead_after_s=dead_after,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
    except ValueError as exc:
        typer.echo(f"memkv node: {exc}", err=True)
        raise typer.Exit(2) from None
    sys.exit(run_node(config))


def _size(flag: str, text: str) -> int:
    from lmcache_memkv.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def run_node(config: object) -> int:
    """Start data and control planes, wait for SIGTERM/SIGINT, drain, exit 0."""
    from lmcache_memkv.node.config import NodeConfig
    from lmcache_memkv.node.server import NodeServer

    assert isinstance(config, NodeConfig)
    log = logging.getLogger("memkv.node")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = NodeServer(config)
        server.start()
    except OSError as exc:
        log.error("%s", exc)
        return 1
    from lmcache_memkv.control.node_service import start_control_plane

    try:
        control = start_control_plane(server, config)
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("control plane: %s", exc)
        server.stop(0)
        return 1
    # One parseable line for scripts and tests waiting for readiness.
    ready = f"memkv node {config.node_id} ready data={server.endpoint} pid={os.getpid()} control={control.endpoint}"
    if server.metrics_address:
        ready += f" metrics={server.metrics_address[0]}:{server.metrics_address[1]}"
    print(ready, flush=True)
    stop.wait()
    server.stop_accepting()  # first: no new client should land on a node that is leaving
    log.info("shutting down: no new connections, finishing in-flight requests")
    control.stop()
    drained = server.stop()
    log.info("stopped (%s)", "drained" if drained else "drain timed out")
    return 0
