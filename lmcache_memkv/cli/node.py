"""``memkv node``: run a MemKV memory node."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from typing import Annotated, Any

import typer

HELP = "Run a MemKV node: a memory server that pools this host's DRAM for LMCache."
EXAMPLE = "Example: memkv node --listen 127.0.0.1:9900 --capacity 8GiB --metrics-listen 127.0.0.1:9910"


def node(
    ctx: typer.Context,
    config_file: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="YAML file of node settings, keys named like the flags (capacity: 8GiB). Flags and MEMKV_* variables override it.",
            envvar="MEMKV_NODE_CONFIG",
        ),
    ] = None,
    listen: Annotated[str, typer.Option(help="Data-plane address HOST:PORT.", envvar="MEMKV_LISTEN")] = "127.0.0.1:9900",
    capacity: Annotated[str, typer.Option(help="Arena size, e.g. 512MiB or 64GiB.", envvar="MEMKV_CAPACITY")] = "1GiB",
    node_id: Annotated[str, typer.Option(help="Unique node name (default: HOSTNAME-PORT).", envvar="MEMKV_NODE_ID")] = "",
    metrics_listen: Annotated[
        str | None, typer.Option(help="Serve HTTP on HOST:PORT: Prometheus /metrics, /healthz and /readyz.", envvar="MEMKV_METRICS_LISTEN")
    ] = None,
    auth_key_file: Annotated[
        str | None, typer.Option(help="File holding the 64-hex auth key (else MEMKV_AUTH_KEY; unset: no auth).", envvar="MEMKV_AUTH_KEY_FILE")
    ] = None,
    control_listen: Annotated[
        str | None, typer.Option(help="gRPC control address HOST:PORT (default: data port + 1).", envvar="MEMKV_CONTROL_LISTEN")
    ] = None,
    advertise_host: Annotated[
        str | None,
        typer.Option(help="Host name or address peers and clients use to reach this node (e.g. the pod's DNS name when listening on 0.0.0.0).", envvar="MEMKV_ADVERTISE_HOST"),
    ] = None,
    seed: Annotated[list[str] | None, typer.Option(help="Control endpoint of a cluster member to join; repeatable (MEMKV_SEED: comma-separated).", envvar="MEMKV_SEED")] = None,
    heartbeat_interval: Annotated[
        float, typer.Option(help="SWIM protocol period: seconds between probes (each probes one member).", envvar="MEMKV_HEARTBEAT_INTERVAL")
    ] = 0.5,
    suspect_after: Annotated[
        float, typer.Option(help="Seconds a probe (direct, then indirect) may take before its target is SUSPECT.", envvar="MEMKV_SUSPECT_AFTER")
    ] = 1.5,
    dead_after: Annotated[
        float, typer.Option(help="Seconds from a failed probe's start until its unrefuted SUSPECT target is DEAD.", envvar="MEMKV_DEAD_AFTER")
    ] = 3.0,
    indirect_probes: Annotated[
        int, typer.Option(help="Members asked to probe a target that missed a direct ping (SWIM's k).", envvar="MEMKV_INDIRECT_PROBES")
    ] = 3,
    reap_after: Annotated[
        float, typer.Option(help="Seconds a DEAD or LEFT member stays in the view before it is dropped.", envvar="MEMKV_REAP_AFTER")
    ] = 300.0,
    cluster_id: Annotated[
        str, typer.Option(help="Name of the cluster; nodes refuse joins and probes from another cluster's nodes.", envvar="MEMKV_CLUSTER_ID")
    ] = "memkv",
    tls_cert: Annotated[str | None, typer.Option(help="PEM certificate for the control plane (enables TLS).", envvar="MEMKV_TLS_CERT")] = None,
    tls_key: Annotated[str | None, typer.Option(help="PEM private key for --tls-cert.", envvar="MEMKV_TLS_KEY")] = None,
    max_watchers: Annotated[
        int, typer.Option(help="Most view watchers (sidecars) served at once; each costs memory, not a thread.", envvar="MEMKV_MAX_WATCHERS")
    ] = 10_000,
    max_batch: Annotated[int, typer.Option(help="Most keys in one request.", envvar="MEMKV_MAX_BATCH")] = 1024,
    max_value: Annotated[str, typer.Option(help="Largest value accepted.", envvar="MEMKV_MAX_VALUE")] = "1GiB",
    max_meta: Annotated[str, typer.Option(help="Largest frame meta (keys and sizes) accepted.", envvar="MEMKV_MAX_META")] = "1MiB",
    frame_timeout: Annotated[float, typer.Option(help="Seconds a client may take to finish a frame it started.", envvar="MEMKV_FRAME_TIMEOUT")] = 10.0,
    max_frame_payload: Annotated[str, typer.Option(help="Most value bytes one request may carry.", envvar="MEMKV_MAX_FRAME_PAYLOAD")] = "1GiB",
    max_connections: Annotated[int, typer.Option(help="Most authenticated client connections open at once.", envvar="MEMKV_MAX_CONNECTIONS")] = 4096,
    workers: Annotated[
        int, typer.Option(help="Threads serving requests (moving value bytes); one event loop holds all connections.", envvar="MEMKV_WORKERS")
    ] = 32,
    transfers: Annotated[
        int,
        typer.Option(
            help="Large value transfers (256KiB or more) moving at once over TCP; the rest queue, first come first "
            "served, and a transfer waiting on a slow peer lets the next one go. 0: one per CPU the node may use "
            "(affinity and cgroup CPU limit), at least 2.",
            envvar="MEMKV_TRANSFERS",
        ),
    ] = 0,
    max_unauth_connections: Annotated[
        int, typer.Option(help="Most connections still authenticating, all peers together; the oldest gives way to a new one.", envvar="MEMKV_MAX_UNAUTH_CONNECTIONS")
    ] = 64,
    max_unauth_per_host: Annotated[int, typer.Option(help="Most connections still authenticating from one peer address.", envvar="MEMKV_MAX_UNAUTH_PER_HOST")] = 8,
    auth_timeout: Annotated[float, typer.Option(help="Seconds a new connection has to authenticate.", envvar="MEMKV_AUTH_TIMEOUT")] = 2.0,
    idle_timeout: Annotated[float, typer.Option(help="Seconds an idle authenticated connection stays open (0: no limit).", envvar="MEMKV_IDLE_TIMEOUT")] = 0.0,
    max_lease_ttl: Annotated[float, typer.Option(help="Longest lease a client may take, in seconds; longer requests are cut.", envvar="MEMKV_MAX_LEASE_TTL")] = 300.0,
    lease_budget: Annotated[
        str | None, typer.Option(help="Arena bytes one client may hold leased (default: half of --capacity).", envvar="MEMKV_LEASE_BUDGET")
    ] = None,
    max_tombstones: Annotated[
        int, typer.Option(help="Deleted keys remembered so older writes cannot revive them; past it, older writes are refused.", envvar="MEMKV_MAX_TOMBSTONES")
    ] = 100_000,
    drain_timeout: Annotated[float, typer.Option(help="Seconds SIGTERM waits for in-flight requests.", envvar="MEMKV_DRAIN_TIMEOUT")] = 30.0,
    rdma_device: Annotated[
        str | None,
        typer.Option(
            help="RDMA device for the verbs data path (e.g. mlx5_0, rxe0); must open or the node refuses to start. "
            "Default: the first of MEMKV_RDMA_DEVICES (or of all devices) if one opens, else TCP only; 'none': TCP only.",
            envvar="MEMKV_RDMA_DEVICE",
        ),
    ] = None,
    rdma_port: Annotated[int, typer.Option(help="Port of the RDMA device.", envvar="MEMKV_RDMA_PORT")] = 1,
    rdma_gid_index: Annotated[
        int, typer.Option(help="GID table index (RoCE v2 over IPv4 is often 1 or 3; `show_gids` lists them).", envvar="MEMKV_RDMA_GID_INDEX")
    ] = 0,
    max_rdma_sessions: Annotated[
        int,
        typer.Option(
            help="Most RDMA sessions (one queue pair per client process) at once; at the cap a new one takes the slot "
            "of a session idle over 60s, else it is refused and the client retries later.",
            envvar="MEMKV_MAX_RDMA_SESSIONS",
        ),
    ] = 1024,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.", envvar="MEMKV_LOG_LEVEL")] = "info",
) -> None:
    from lmcache_memkv.auth import load_key
    from lmcache_memkv.node.arena import check_capacity
    from lmcache_memkv.node.config import NodeConfig
    from lmcache_memkv.wire.limits import Limits

    try:
        sources = _settings_sources(ctx, config_file)
    except ValueError as exc:
        typer.echo(f"memkv node: {exc}", err=True)
        raise typer.Exit(2) from None
    values = {**ctx.params, **{name: value for name, (value, _) in sources.items()}}
    listen, capacity, node_id, metrics_listen = (values[k] for k in ("listen", "capacity", "node_id", "metrics_listen"))
    control_listen, advertise_host, tls_cert, tls_key = (
        values[k] for k in ("control_listen", "advertise_host", "tls_cert", "tls_key")
    )
    heartbeat_interval, suspect_after, dead_after = (values[k] for k in ("heartbeat_interval", "suspect_after", "dead_after"))
    indirect_probes, reap_after, cluster_id = (values[k] for k in ("indirect_probes", "reap_after", "cluster_id"))
    max_batch, max_value, max_meta, max_frame_payload = (
        values[k] for k in ("max_batch", "max_value", "max_meta", "max_frame_payload")
    )
    frame_timeout, drain_timeout, auth_timeout, idle_timeout = (
        values[k] for k in ("frame_timeout", "drain_timeout", "auth_timeout", "idle_timeout")
    )
    max_connections, max_unauth_connections, max_unauth_per_host, workers, transfers = (
        values[k] for k in ("max_connections", "max_unauth_connections", "max_unauth_per_host", "workers", "transfers")
    )
    max_lease_ttl, lease_budget, max_tombstones = (values[k] for k in ("max_lease_ttl", "lease_budget", "max_tombstones"))
    max_watchers, max_rdma_sessions = values["max_watchers"], values["max_rdma_sessions"]
    rdma_device, rdma_port, rdma_gid_index = (values[k] for k in ("rdma_device", "rdma_port", "rdma_gid_index"))
    auth_key_file, log_level = values["auth_key_file"], values["log_level"]
    # MEMKV_SEED and config files may list several endpoints in one comma-separated string.
    seeds = [part.strip() for entry in values["seed"] or [] for part in str(entry).split(",") if part.strip()]
    try:
        if str(log_level).lower() not in _LOG_LEVELS:
            raise ValueError(f"--log-level: {log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
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
            workers=workers,
            transfers=transfers,
            max_unauth_connections=max_unauth_connections,
            max_unauth_per_host=max_unauth_per_host,
            auth_timeout_s=auth_timeout,
            idle_timeout_s=idle_timeout,
            max_lease_ttl_s=max_lease_ttl,
            lease_budget=_size("--lease-budget", lease_budget) if lease_budget is not None else None,
            max_tombstones=max_tombstones,
            control_listen=control_listen,
            advertise_host=advertise_host,
            seeds=seeds,
            heartbeat_interval_s=heartbeat_interval,
            suspect_after_s=suspect_after,
            dead_after_s=dead_after,
            indirect_probes=indirect_probes,
            reap_after_s=reap_after,
            cluster_id=cluster_id,
            tls_cert=tls_cert,
            tls_key=tls_key,
            max_watchers=max_watchers,
            rdma_device=rdma_device,
            rdma_port=rdma_port,
            rdma_gid_index=rdma_gid_index,
            max_rdma_sessions=max_rdma_sessions,
        )
        check_capacity(config.capacity)
    except ValueError as exc:
        message = _flag_named(ctx, str(exc))
        typer.echo(f"memkv node: {message}{_source_note(ctx, sources, message)}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=str(log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_node(config))


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _settings_sources(ctx: typer.Context, config_file: str | None) -> dict[str, tuple[Any, str]]:
    """Settings the config file supplies: name -> (value, where from). Precedence: defaults <
    config file < environment < flags, so a key is taken only where the flag came from its default."""
    from lmcache_memkv.yamlfile import load_mapping

    if not config_file:
        return {}
    doc = load_mapping(config_file, "--config")
    params = {p.name for p in ctx.command.params if p.param_type_name == "option" and p.name not in (None, "config_file")}
    out: dict[str, tuple[Any, str]] = {}
    for key, value in doc.items():
        name = str(key).replace("-", "_")
        if name not in params:
            known = ", ".join(sorted(_flag(n)[2:] for n in params if n != "help"))
            raise ValueError(f"--config {config_file}: unknown setting {key!r}; settings are: {known}")
        if _source(ctx, name) not in ("DEFAULT", "DEFAULT_MAP"):
            continue  # the environment or a flag set it: they win
        where = f"{config_file} ({key})"
        out[name] = (_convert(_kind(name), value, where), where)
    return out


def _kind(name: str) -> type:
    """The Python type of ``node``'s parameter ``name`` (the base of ``Annotated[T | None, ...]``)."""
    import types
    import typing

    hint = typing.get_type_hints(node)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else []
    hint = args[0] if args else hint
    return list if typing.get_origin(hint) is list else hint


def _convert(kind: type, value: Any, where: str) -> Any:
    """A config file value as the flag's type; ValueError naming ``where`` otherwise."""
    if value is None:
        return None
    if kind is list:
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, (list, dict)) for v in items):
            raise ValueError(f"{where}: expected endpoints HOST:PORT, got {value!r}")
        return [str(v) for v in items]
    if isinstance(value, (list, dict, bool)):
        raise ValueError(f"{where}: expected a single {kind.__name__} value, got {value!r}")
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not a valid {'integer' if kind is int else 'number'}") from None
    return str(value)


def _flag_named(ctx: typer.Context, message: str) -> str:
    """Some checks name the setting (``max_batch``, ``frame_timeout_s``): say the flag instead."""
    first, _, rest = message.partition(" ")
    for param in ctx.command.params:
        if param.name and first in (param.name, f"{param.name}_s", f"{param.name}_len"):
            return f"{_flag(param.name)} {rest}"
    return message


def _source(ctx: typer.Context, name: str) -> str:
    source = ctx.get_parameter_source(name)
    return source.name if source is not None else "DEFAULT"


def _source_note(ctx: typer.Context, sources: dict[str, tuple[Any, str]], message: str) -> str:
    """' (set in FILE (key))' or ' (set by MEMKV_X)' when the flag a message names was not typed."""
    for param in ctx.command.params:
        name = param.name or ""
        flag = _flag(name)
        if not message.startswith(flag) and f" {flag}" not in message and not message.startswith(f"{name}_s "):
            continue
        if name in sources:
            return f" (set in {sources[name][1]})"
        if _source(ctx, name) == "ENVIRONMENT":
            return f" (set by {getattr(param, 'envvar', None)})"
    return ""


def _size(flag: str, text: str) -> int:
    from lmcache_memkv.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


# Young collections every 10k allocations (not 700), a full one considered after 50 x 100 of
# them: a full collection walks every live object, the index's entries included, so its pause
# grows with the values a node holds (64-74 ms at 96k values here, mid-lookup).
GC_THRESHOLDS = (10_000, 50, 100)


def tune_gc() -> None:
    """Once start-up is done: its objects (gRPC, prometheus, the CLI) are never garbage, so no
    collection walks them again (``gc.freeze``); and collections come less often (see above).
    Reference cycles are still collected, by the young collections and the rarer full ones."""
    gc.collect()  # what start-up left as garbage is freed, not frozen for good
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_node(config: object) -> int:
    """Start data and control planes, wait for SIGTERM/SIGINT, drain, exit 0."""
    from lmcache_memkv.node.arena import PrefaultInterrupted, StopFlag
    from lmcache_memkv.node.config import NodeConfig
    from lmcache_memkv.node.server import NodeServer, raise_nofile_limit
    from lmcache_memkv.sizes import format_size

    assert isinstance(config, NodeConfig)
    log = logging.getLogger("memkv.node")
    stop = StopFlag()
    # Installed before the arena is faulted in, which takes seconds per GiB: a SIGTERM then
    # stops the pre-fault between chunks instead of waiting for all of it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    raise_nofile_limit()  # one descriptor per connection: thousands of clients must fit
    log.info("faulting in the %s arena", format_size(config.capacity))
    try:
        server = NodeServer(config, stop)
    except PrefaultInterrupted as exc:
        log.info("signalled while faulting in the arena (%s): exiting", exc)
        return 0
    except MemoryError as exc:
        log.error("%s", exc)
        return 1
    try:
        server.start()
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        return 1
    from lmcache_memkv.control.node_service import start_control_plane

    try:
        control = start_control_plane(server, config)
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("control plane: %s", exc)
        server.stop(0)
        return 1
    server.serving.set()
    tune_gc()
    # One parseable line for scripts and tests waiting for readiness.
    ready = f"memkv node {config.node_id} ready data={server.endpoint} pid={os.getpid()} control={control.endpoint}"
    if server.metrics_address:
        ready += f" metrics={server.metrics_address[0]}:{server.metrics_address[1]}"
    print(ready, flush=True)
    while not stop.is_set():  # polled: the handler only flips a flag (see StopFlag)
        time.sleep(0.1)
    server.serving.clear()  # /readyz: 503 from now on
    server.stop_accepting()  # first: no new client should land on a node that is leaving
    log.info("shutting down: no new connections, finishing in-flight requests")
    control.leave()  # peers see LEFT; gRPC health answers NOT_SERVING while the data plane drains
    drained = server.stop()
    control.close()
    log.info("stopped (%s)", "drained" if drained else "drain timed out")
    return 0
