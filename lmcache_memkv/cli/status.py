"""``memkv status``: the cluster's members and view epoch, as the first node that answers sees them."""

from __future__ import annotations

import json
from typing import Annotated

import typer

HELP = "Show the MemKV cluster's members (state, endpoints, usage, incarnation) and its view epoch."
EXAMPLE = "Example: memkv status --servers 10.0.0.5:9901,10.0.0.6:9901   (or MEMKV_SERVERS=...; add --json for scripts)"

_STYLE = {"ALIVE": "green", "SUSPECT": "yellow", "DEAD": "red", "LEFT": "dim"}


def status(
    servers: Annotated[
        str,
        typer.Option(help="Control endpoints HOST:PORT, comma-separated; any one suffices.", envvar="MEMKV_SERVERS"),
    ] = "",
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    auth_key_file: Annotated[
        str | None, typer.Option(help="File holding the 64-hex auth key (else MEMKV_AUTH_KEY; unset: no auth).", envvar="MEMKV_AUTH_KEY_FILE")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a node to answer.")] = 5.0,
) -> None:
    from lmcache_memkv.auth import load_key
    from lmcache_memkv.cluster.bootstrap import fetch_view
    from lmcache_memkv.control.channel import ChannelPool
    from lmcache_memkv.control.tls import ca_from_env
    from lmcache_memkv.endpoints import parse_endpoint, split_servers
    from lmcache_memkv.errors import ConnectError

    endpoints = split_servers(servers)
    try:
        if not endpoints:
            raise ValueError("--servers: no control endpoint given (or set MEMKV_SERVERS=HOST:PORT[,HOST:PORT])")
        for endpoint in endpoints:
            parse_endpoint(endpoint, field="--servers")
        if timeout <= 0:
            raise ValueError(f"--timeout must be positive, got {timeout}")
        key = load_key(auth_key_file)
    except ValueError as exc:
        typer.echo(f"memkv status: {exc}", err=True)
        raise typer.Exit(2) from None
    pool = ChannelPool(key, ca_from_env())
    try:
        epoch, members, source = fetch_view(pool, endpoints, timeout)
    except ConnectError as exc:
        typer.echo(f"memkv status: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        pool.close()

    up = sum(m.state == "ALIVE" for m in members)
    if json_output:
        doc = {
            "epoch": epoch,
            "source": source,
            "members_up": up,
            "members_down": len(members) - up,
            "members": [
                {
                    "node_id": m.node_id,
                    "state": str(m.state),
                    "incarnation": m.incarnation,
                    "data_endpoint": m.data_endpoint,
                    "control_endpoint": m.control_endpoint,
                    "transports": list(m.transports),
                    "used_bytes": m.used_bytes,
                    "capacity_bytes": m.capacity_bytes,
                }
                for m in members
            ],
        }
        typer.echo(json.dumps(doc, indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    from lmcache_memkv.sizes import format_size

    table = Table(title=f"MemKV cluster: epoch {epoch}, {up} of {len(members)} members up (view of {source})")
    # Readable at 80 columns: each endpoint pair on two lines (never folded mid-address), node ids
    # fold, and the incarnation (a start time in ms) shown as the UTC start minute; --json has it raw.
    table.add_column("node", overflow="fold")
    table.add_column("state\ntransports")
    table.add_column("data\ncontrol", no_wrap=True)
    table.add_column("used /\ncapacity", justify="right")
    table.add_column("started\n(UTC)", justify="right")
    for m in members:
        style = _STYLE.get(str(m.state), "")
        table.add_row(
            m.node_id,
            (f"[{style}]{m.state}[/{style}]" if style else str(m.state)) + "\n" + ("+".join(m.transports) or "-"),
            f"{m.data_endpoint}\n{m.control_endpoint}",
            f"{format_size(m.used_bytes)} /\n{format_size(m.capacity_bytes)}",
            _started(m.incarnation),
        )
    Console().print(table)  # the terminal's width (COLUMNS when not a terminal; 80 by default)


def _started(incarnation_ms: int) -> str:
    import datetime

    try:
        when = datetime.datetime.fromtimestamp(incarnation_ms / 1000, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return str(incarnation_ms)
    return when.strftime("%m-%d %H:%M")
