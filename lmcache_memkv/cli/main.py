"""Entry point of the ``memkv`` command; each command lives in its own module."""

from __future__ import annotations

import typer

from lmcache_memkv.cli import keygen as keygen_cmd
from lmcache_memkv.cli import node as node_cmd
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


app.command("node", help=node_cmd.HELP, epilog=node_cmd.EXAMPLE)(node_cmd.node)
app.command("keygen", help=keygen_cmd.HELP, epilog=keygen_cmd.EXAMPLE)(keygen_cmd.keygen)
app.command("status", help=status_cmd.HELP, epilog=status_cmd.EXAMPLE)(status_cmd.status)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
