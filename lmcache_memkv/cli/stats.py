"""``memkv stats``: per-node statistics and cluster totals, once or as a live table.

One Maintenance.ClusterStats call to the first control endpoint that answers: that node asks
every live member for its Status and sums them, so the table is one consistent round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from lmcache_memkv.control.channel import ChannelPool
    from lmcache_memkv.proto.memkv.v1 import maintenance_pb2

HELP = "Show per-node and cluster-wide MemKV statistics (keys, usage, hit ratio, ops/s, evictions, leases)."
EXAMPLE = "Example: memkv stats --servers 10.0.0.5:9901 --watch   (or MEMKV_SERVERS=...; add --json for scripts)"

_STYLE = {"ALIVE": "green", "SUSPECT": "yellow", "DEAD": "red", "LEFT": "dim"}
_COLUMNS = ("node", "state", "keys", "used / capacity", "hit ratio", "ops/s", "evictions", "leases")


class UsageError(ValueError):
    """A bad option value: the command prints it on one line and exits 2."""


def resolve_servers(servers: str, auth_key_file: str | None, command: str) -> tuple[list[str], bytes | None]:
    """Control endpoints and auth key from the options (or MEMKV_SERVERS / MEMKV_AUTH_KEY_FILE / MEMKV_AUTH_KEY)."""
    from lmcache_memkv.auth import load_key
    from lmcache_memkv.endpoints import parse_endpoint, split_servers

    endpoints = split_servers(servers)
    try:
        if not endpoints:
            raise ValueError("--servers: no control endpoint given (or set MEMKV_SERVERS=HOST:PORT[,HOST:PORT])")
        for endpoint in endpoints:
            parse_endpoint(endpoint, field="--servers")
        return endpoints, load_key(auth_key_file)
    except ValueError as exc:
        raise UsageError(f"memkv {command}: {exc}") from None


def wide_console() -> Console:
    """A terminal's own width; 160 columns when piped, so tables in logs and CI are not squeezed."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def one_line(text: str) -> str:
    """gRPC details can span lines; an operator's error stays on one."""
    return " ".join(str(text).split())


@dataclass(frozen=True)
class ClusterStats:
    """One ClusterStats answer, as plain data."""

    source: str
    answered_by: str
    epoch: int
    members_up: int
    members_down: int
    nodes: list[dict[str, Any]]
    total: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "answered_by": self.answered_by,
            "epoch": self.epoch,
            "members_up": self.members_up,
            "members_down": self.members_down,
            "nodes": self.nodes,
            "total": self.total,
        }


def fetch_cluster_stats(pool: ChannelPool, endpoints: Sequence[str], timeout_s: float) -> ClusterStats:
    """Ask every endpoint at once and take the first answer; ConnectError naming each one tried."""
    import grpc

    from lmcache_memkv.cluster.bootstrap import first_answer
    from lmcache_memkv.control.response_auth import CLUSTER_STATS, fresh_nonce
    from lmcache_memkv.errors import ConnectError
    from lmcache_memkv.proto.memkv.v1 import maintenance_pb2, maintenance_pb2_grpc

    request = maintenance_pb2.ClusterStatsRequest(nonce=fresh_nonce())

    def call(channel: grpc.Channel, timeout: float) -> grpc.Future:
        stub = maintenance_pb2_grpc.MaintenanceStub(channel)
        return stub.ClusterStats.future(request, timeout=timeout)

    def accept(reply: maintenance_pb2.ClusterStatsResponse) -> maintenance_pb2.ClusterStatsResponse:
        pool.check_reply(CLUSTER_STATS, request, reply)  # a node without our key reports nothing
        return reply

    try:
        reply, source = first_answer(pool, endpoints, call, accept, timeout_s)
    except ConnectError as exc:
        raise ConnectError(one_line(str(exc))) from None
    return _from_proto(source, reply)


def _from_proto(source: str, reply: maintenance_pb2.ClusterStatsResponse) -> ClusterStats:
    from lmcache_memkv.control.member import State
    from lmcache_memkv.control.stats import stats_dict

    nodes: list[dict[str, Any]] = []
    for n in reply.nodes:
        try:
            state = str(State.from_rank(n.state))
        except ValueError:
            state = "UNKNOWN"
        row: dict[str, Any] = {"node_id": n.node_id, "state": state}
        if n.HasField("stats"):
            row.update(stats_dict(n.stats))
        if n.error:
            row["error"] = n.error
        nodes.append(row)
    return ClusterStats(
        source=source,
        answered_by=reply.header.node_id,
        epoch=reply.header.epoch,
        members_up=reply.members_up,
        members_down=reply.members_down,
        nodes=nodes,
        total=dict(stats_dict(reply.total)),
    )


def _usage(stats: dict[str, Any]) -> str:
    from lmcache_memkv.sizes import format_size

    used, capacity = int(stats.get("used_bytes", 0)), int(stats.get("capacity_bytes", 0))
    share = f" ({used / capacity:.0%})" if capacity else ""
    return f"{format_size(used)} / {format_size(capacity)}{share}"


def _figures(stats: dict[str, Any]) -> list[str]:
    return [
        f"{int(stats.get('keys', 0)):,}",
        _usage(stats),
        f"{float(stats.get('hit_ratio', 0.0)):.1%}",
        f"{float(stats.get('ops_per_second', 0.0)):,.1f}",
        f"{int(stats.get('evictions', 0)):,}",
        f"{int(stats.get('leases', 0)):,}",
    ]


def render_table(stats: ClusterStats | None, error: str | None = None, refreshed: float | None = None) -> Table:
    """The stats table; with ``error`` (watch mode) the last good numbers stay and the error is the caption."""
    from rich.table import Table

    if stats is None:
        table = Table(title="MemKV cluster stats", caption=f"[red]{error}[/red]" if error else None)
        for column in _COLUMNS:
            table.add_column(column)
        return table
    up, total = stats.members_up, stats.members_up + stats.members_down
    title = f"MemKV cluster stats: {up} of {total} members up, epoch {stats.epoch} (via {stats.source})"
    caption = None
    if error:
        caption = f"[red]{error}[/red]"
    elif refreshed is not None:
        caption = f"[dim]updated {time.strftime('%H:%M:%S', time.localtime(refreshed))}; Ctrl-C to stop[/dim]"
    table = Table(title=title, caption=caption, show_footer=False)
    for column in _COLUMNS:
        table.add_column(column, justify="left" if column in ("node", "state") else "right")
    for node in stats.nodes:
        style = _STYLE.get(node["state"], "")
        state = f"[{style}]{node['state']}[/{style}]" if style else node["state"]
        if "error" in node and "keys" not in node:
            table.add_row(node["node_id"], state, f"[dim]{one_line(node['error'])}[/dim]", "", "", "", "", "")
        else:
            table.add_row(node["node_id"], state, *_figures(node))
    table.add_section()
    table.add_row("[bold]cluster[/bold]", f"{up}/{total} up", *_figures(stats.total), style="bold")
    return table


def stats(
    servers: Annotated[
        str,
        typer.Option(help="Control endpoints HOST:PORT, comma-separated; any one suffices.", envvar="MEMKV_SERVERS"),
    ] = "",
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh the table until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table (one object per line with --watch).")
    ] = False,
    auth_key_file: Annotated[
        str | None, typer.Option(help="File holding the 64-hex auth key (else MEMKV_AUTH_KEY; unset: no auth).", envvar="MEMKV_AUTH_KEY_FILE")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a node to answer.")] = 5.0,
) -> None:
    try:
        endpoints, key = resolve_servers(servers, auth_key_file, "stats")
        if timeout <= 0:
            raise UsageError(f"memkv stats: --timeout must be positive, got {timeout}")
        if interval <= 0:
            raise UsageError(f"memkv stats: --interval must be positive, got {interval}")
    except UsageError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None

    from lmcache_memkv.control.channel import ChannelPool
    from lmcache_memkv.control.tls import ca_from_env
    from lmcache_memkv.errors import ConnectError

    pool = ChannelPool(key, ca_from_env())
    try:
        if watch:
            _watch(pool, endpoints, timeout, interval, json_output)
            return
        try:
            result = fetch_cluster_stats(pool, endpoints, timeout)
        except ConnectError as exc:
            typer.echo(f"memkv stats: {exc}", err=True)
            raise typer.Exit(1) from None
        if json_output:
            typer.echo(json.dumps(result.to_json(), indent=2))
        else:
            wide_console().print(render_table(result))
    finally:
        pool.close()


def _watch(pool: ChannelPool, endpoints: list[str], timeout_s: float, interval_s: float, json_output: bool) -> None:
    """Refresh until Ctrl-C (exit 0). A failing round keeps the last numbers on screen and shows why."""
    from rich.live import Live

    from lmcache_memkv.errors import ConnectError

    last: ClusterStats | None = None
    console = wide_console()
    try:
        if json_output:
            while True:
                try:
                    doc: dict[str, Any] = {
                        "time": time.time(),
                        **fetch_cluster_stats(pool, endpoints, timeout_s).to_json(),
                    }
                except ConnectError as exc:
                    doc = {"time": time.time(), "error": str(exc)}
                typer.echo(json.dumps(doc))
                time.sleep(interval_s)
        with Live(render_table(None), console=console, auto_refresh=False, transient=False) as live:
            while True:
                error = None
                try:
                    last = fetch_cluster_stats(pool, endpoints, timeout_s)
                except ConnectError as exc:
                    error = f"memkv stats: {exc}"
                live.update(render_table(last, error, time.time()), refresh=True)
                time.sleep(interval_s)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends
