"""Entry point of the ``memkv`` command; each command lives in its own module."""

from __future__ import annotations

import typer

from lmcache_memkv.cli import bench as bench_cmd
from lmcache_memkv.cli import demo as demo_cmd
from lmcache_memkv.cli import keygen as keygen_cmd
from lmcache_memkv.cli import node as node_cmd
from lmcache_memkv.cli import stats as stats_cmd
from lmcache_memkv.cli import status as status_cmd

app = typer.Typer(
    name="memkv",
    help="MemKV: a cluster memory tier for LMCache. Run `memkv COMMAND --help` for details.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)


@app.callback()
def _root() -> None:
    """MemKV: a cluster memory tier for LMCache."""


app.command("demo", help=demo_cmd.HELP, epilog=demo_cmd.EXAMPLE)(demo_cmd.demo)
app.command("node", help=node_cmd.HELP, epilog=node_cmd.EXAMPLE)(node_cmd.node)
app.command("keygen", help=keygen_cmd.HELP, epilog=keygen_cmd.EXAMPLE)(keygen_cmd.keygen)
app.command("status", help=status_cmd.HELP, epilog=status_cmd.EXAMPLE)(status_cmd.status)
app.command("stats", help=stats_cmd.HELP, epilog=stats_cmd.EXAMPLE)(stats_cmd.stats)
app.command("bench", help=bench_cmd.HELP, epilog=bench_cmd.EXAMPLE)(bench_cmd.bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
